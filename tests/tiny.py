"""Tiny random Stable Diffusion pipelines for tests: real diffusers classes, a few KB of
weights, built offline (the tokenizer's vocabulary is made in code, no download)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lowvram_ddpo.architectures import FLUX2_SCHEDULER, SD_SCHEDULER
from lowvram_ddpo.pocket.tokenizer import build_chat_tokenizer, build_tokenizer
from lowvram_ddpo.rewards import ModelReward


def tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level alphabet and special tokens only (no merges): any text tokenizes."""
    return build_tokenizer([], max_length=16)


@torch.no_grad()
def make_decoder_transparent(vae: AutoencoderKL, gain: float = 0.5) -> None:
    """Turn the random decoder into a plain upsampler (residual branches zeroed, identity
    convolutions), so an image's structure follows its latent's: rewards such as JPEG size
    then respond to what the policy does instead of to the decoder's own random texture."""

    def identity(conv: torch.nn.Conv2d, channels: int, scale: float = 1.0) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        centre = conv.weight.shape[-1] // 2
        for c in range(channels):
            conv.weight[c, c, centre, centre] = scale

    decoder = vae.decoder
    identity(vae.post_quant_conv, vae.config.latent_channels)
    identity(decoder.conv_in, vae.config.latent_channels)
    for module in decoder.modules():
        if module.__class__.__name__ == "ResnetBlock2D":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        elif module.__class__.__name__ == "Attention":
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif module.__class__.__name__ == "Upsample2D":
            identity(module.conv, module.conv.in_channels)
    identity(decoder.conv_out, 3, gain)


TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)


def tiny_vae(**overrides: object) -> AutoencoderKL:
    """A 3-level VAE (latents 1/4 of the image side) whose decoder passes latents through."""
    config = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    vae = AutoencoderKL(**(config | overrides))
    make_decoder_transparent(vae)
    return vae


def tiny_text_config(tokenizer: CLIPTokenizer, **overrides: object) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with random weights: 32 px images, 8x8x4 latents."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = tiny_vae()
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    scheduler = DDIMScheduler(**SD_SCHEDULER)  # Stable Diffusion's noise schedule
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


TINY_SDXL_UNET = dict(
    TINY_UNET,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,  # the two text encoders' widths, concatenated
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text (32)
)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline with random weights (two text encoders, pooled and
    time-id conditioning, an fp16-unsafe VAE flag as SDXL's): 32 px images."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(force_upcast=True, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=UNet2DConditionModel(**TINY_SDXL_UNET),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        add_watermarker=False,
    )


def smooth_latents(count: int, generator: torch.Generator, size: int = 8) -> torch.Tensor:
    """Low-frequency random latents (bilinear upsampling of a 2x2 field): the "data" that
    ``train_tiny_denoiser`` teaches the tiny UNet to generate."""
    coarse = torch.randn(count, 4, 2, 2, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def train_tiny_denoiser(
    pipe: StableDiffusionPipeline, steps: int = 100, batch: int = 64, seed: int = 0
) -> StableDiffusionPipeline:
    """A hundred steps of the standard epsilon loss on smooth latents, so that samples
    have structure the policy can change (a random UNet only passes its noise through)."""
    generator = torch.Generator().manual_seed(seed)
    unet, scheduler = pipe.unet, pipe.scheduler
    with torch.no_grad():
        ids = pipe.tokenizer(
            ["a cat", "a dog", ""], padding="max_length", max_length=16, return_tensors="pt"
        ).input_ids
        embeds = pipe.text_encoder(ids)[0]
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        x0 = smooth_latents(batch, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        cond = embeds[torch.randint(0, 3, (batch,), generator=generator)]
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    return pipe


def word_level_tokenizer(tokens: list[str], wrap_in_bos_eos: bool = False, **special: object):  # noqa: ANN201
    """A fast tokenizer whose vocabulary is ``tokens`` in order (one id per word, split on
    whitespace), with <s>, </s>, <pad>, <unk> as its special tokens; ``wrap_in_bos_eos``
    adds <s> ... </s> around each sentence as RoBERTa's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if wrap_in_bos_eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        **special,
    )


def save_tiny_vlm(folder) -> None:  # noqa: ANN001
    """A random LLaVA (tiny CLIP vision tower + tiny Llama) with a word-level tokenizer and
    a chat template, saved as a model + processor folder that AutoModelForImageTextToText
    and AutoProcessor load: the local captioner's path without a download."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
    words += ["a", "an", "the", "cat", "dog", "riding", "bike", "what", "is", "going"]
    words += ["on", "in", "this", "image", "?"]
    fast = word_level_tokenizer(words, extra_special_tokens={"image_token": "<image>"})
    template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        image_token_index=words.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def assert_replay_gives_ratio_one(
    unet: torch.nn.Module,
    policy,
    samples,
    negative,
    guidance_scale: float,  # noqa: ANN001
) -> None:
    """Re-scoring stored actions under unchanged weights, in the training path and in another
    batch order (samples 2 and 0 at each step), reproduces the log-probs of sampling."""
    from lowvram_ddpo.algorithms.steps import MicroBatch, policy_gradient_loss

    advantages = torch.linspace(1.0, -1.0, len(samples))
    for k in range(samples.log_probs.shape[1]):
        batch = MicroBatch(samples=torch.tensor([2, 0]), steps=torch.tensor([k, k]))
        with torch.no_grad():
            _, metrics = policy_gradient_loss(
                "ddpo-is", unet, policy, samples, batch, advantages, negative, guidance_scale, 1e-4
            )
        assert metrics["clipfrac"].item() == 0.0
        assert metrics["approx_kl"].item() < 1e-10


def save_random_lora(pipe, folder: Path) -> Path:  # noqa: ANN001
    """A random LoRA on the pipeline's UNet, saved in diffusers' format by the pipeline's own
    ``save_lora_weights`` (SD or SDXL layout), as an LCM-LoRA file would be; the UNet is
    left with the adapter."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"])
    )
    type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder / "pytorch_lora_weights.safetensors"


TINY_SD3_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=64,  # the CLIP encoders' widths, concatenated (T5's slot: none here)
    caption_projection_dim=16,
    pooled_projection_dim=64,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline with random weights (SD 3.5 Medium's architecture, two
    CLIP text encoders, no T5, a shifted flow-matching schedule): 32 px images."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32)),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


TINY_FLUX2_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # the VAE's 4 latent channels, packed in 2x2 patches
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # Qwen3's hidden states of layers 9, 18 and 27, stacked (3 x 16)
    axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l): sums to attention_head_dim
    guidance_embeds=False,  # FLUX.2 [klein]: no distilled-guidance embedding
)

TINY_FLUX2_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),  # latents 1/2 of the image side
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    patch_size=(2, 2),
)

TINY_QWEN3 = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=28,  # the pipeline reads hidden_states[9], [18] and [27]
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def build_tiny_flux2_pipeline(seed: int = 0, distilled: bool = False) -> Flux2KleinPipeline:
    """A Flux2KleinPipeline with random weights (FLUX.2 [klein]'s architecture: a 28-layer
    Qwen3 text encoder read at layers 9, 18, 27, a double- and a single-stream block, the
    FLUX.2 VAE with its latent BatchNorm statistics, a dynamically shifted flow-matching
    schedule): 32 px images, 16x16x4 latents packed into 8x8 tokens of 16 channels.
    ``distilled`` marks it step-distilled as FLUX.2 [klein] 4B/9B (no CFG pass)."""
    torch.manual_seed(seed)
    tokenizer = build_chat_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **TINY_QWEN3,
        )
    )
    vae = AutoencoderKLFlux2(**TINY_FLUX2_VAE)
    make_decoder_transparent(vae)
    with torch.no_grad():  # non-trivial latent statistics, as the real VAE's
        vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER),
        is_distilled=distilled,
    )


def assert_batch_independent_and_differentiable(
    make_reward: Callable[[int], ModelReward], prompts: list[str], seed: int
) -> None:
    """A model reward's scores do not depend on its scoring batch, and are differentiable
    in the images while no weight of the scorer trains."""
    images = torch.rand(len(prompts), 3, 32, 48, generator=torch.Generator().manual_seed(seed))
    one = make_reward(1)(images, prompts)
    three = make_reward(3)(images, prompts)
    assert torch.allclose(one, three, atol=1e-5)
    reward = make_reward(8)
    images.requires_grad_(True)
    reward.score(images, prompts).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.module.parameters())
