"""Prompt alignment: BERTScore on a tiny random encoder, and the HTTP captioner against a
real chat-completions server on 127.0.0.1 started by the test."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from lowvram_ddpo.config import RewardConfig, load_preset
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.prompts import load_prompts
from lowvram_ddpo.rewards.alignment import PromptAlignmentReward
from lowvram_ddpo.rewards.bertscore import BertScorer, greedy_match
from lowvram_ddpo.rewards.captioners import CaptionerError, HttpCaptioner

WORDS = [
    "the",
    "image",
    "contains",
    "a",
    "an",
    "cat",
    "dog",
    "fox",
    "riding",
    "bike",
    "playing",
    "chess",
    "washing",
    "dishes",
]


# ---------------------------------------------------------------- BERTScore


def test_greedy_matching_on_hand_computed_embeddings():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidate = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # similarity [ref x cand] = [[1, 0.6], [0, 0.8]]
    precision, recall = greedy_match(candidate, reference)
    assert recall.item() == pytest.approx((1.0 + 0.8) / 2)
    assert precision.item() == pytest.approx((1.0 + 0.8) / 2)
    precision, recall = greedy_match(candidate[:1], reference)  # only the first token
    assert recall.item() == pytest.approx(0.5) and precision.item() == pytest.approx(1.0)
    assert greedy_match(candidate[:0], reference)[1].item() == 0.0  # empty answer


@pytest.fixture(scope="module")
def bertscore() -> BertScorer:
    from tiny import word_level_tokenizer

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *WORDS]  # RoBERTa's ids: <pad> is 1
    fast = word_level_tokenizer(tokens, wrap_in_bos_eos=True)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    return BertScorer(RobertaModel(config), fast, layer=2)


def test_identical_sentences_score_1_and_others_less(bertscore):
    scores = bertscore(
        ["a cat riding a bike", "a dog playing chess"],
        ["a cat riding a bike", "a fox washing the dishes"],
    )
    assert scores.recall[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores.f1[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores.recall[1] < 0.99 and scores.precision[1] < 0.99
    # padding does not change a sentence's score
    alone = bertscore(["a dog playing chess"], ["a fox washing the dishes"])
    torch.testing.assert_close(alone.recall, scores.recall[1:], rtol=1e-5, atol=1e-5)


def test_layer_out_of_range_is_a_clear_error(bertscore):
    with pytest.raises(UserError, match="bertscore_layer 9"):
        BertScorer(bertscore.model, bertscore.tokenizer, layer=9)


# ---------------------------------------------------------------- the HTTP captioner


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up on a slow answer (the timeout tests) is expected here: no
    traceback for the pipe it closed."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Server:
    """A chat-completions server whose behaviour the test scripts per request."""

    def __init__(self) -> None:
        self.script: list[str] = []  # "ok", "500", "503", "400", "slow", "bad-json"
        self.requests: list[dict] = []
        self.answer = "a cat riding a bike"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body})
                action = server.script.pop(0) if server.script else "ok"
                if action == "slow":
                    time.sleep(1.0)
                    action = "ok"
                if action in ("500", "503", "400"):
                    self.send_response(int(action))
                    self.end_headers()
                    return
                reply = (
                    {"nothing": 1}
                    if action == "bad-json"
                    else {"choices": [{"message": {"role": "assistant", "content": server.answer}}]}
                )
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()


def _captioner(server: _Server, **options: object) -> HttpCaptioner:
    return HttpCaptioner(url=server.url, model="tiny-vlm", retries=2, **options)


def test_http_captioner_sends_the_image_and_question(server):
    images = torch.rand(3, 3, 16, 16)
    answers = _captioner(server)(images, "What is going on?")
    assert answers == ["a cat riding a bike"] * 3
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "tiny-vlm" and request["body"]["temperature"] == 0.0
    content = request["body"]["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "What is going on?"}
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_http_captioner_retries_a_server_error_then_succeeds(server):
    server.script = ["503"]
    assert _captioner(server, parallel=1)(torch.rand(1, 3, 8, 8), "q") == ["a cat riding a bike"]
    assert len(server.requests) == 2


def test_http_captioner_retries_after_a_timeout(server):
    server.script = ["slow"]
    captioner = _captioner(server, parallel=1, timeout=0.3)
    assert captioner(torch.rand(1, 3, 8, 8), "q") == ["a cat riding a bike"]
    assert len(server.requests) == 2


def test_http_captioner_gives_up_with_a_clear_error(server):
    server.script = ["500"] * 3
    with pytest.raises(CaptionerError, match="failed after 3 tries \\(HTTP 500"):
        _captioner(server, parallel=1)(torch.rand(1, 3, 8, 8), "q")
    server.script = ["400"]  # a bad request is not retried
    with pytest.raises(CaptionerError, match="HTTP 400"):
        _captioner(server, parallel=1)(torch.rand(1, 3, 8, 8), "q")
    assert len(server.requests) == 4
    server.script = ["bad-json"]
    with pytest.raises(CaptionerError, match="OpenAI-compatible"):
        _captioner(server, parallel=1)(torch.rand(1, 3, 8, 8), "q")


def test_unreachable_server_is_one_line_advice():
    captioner = HttpCaptioner(url="http://127.0.0.1:9/v1", model="m", retries=1, timeout=1)
    with pytest.raises(CaptionerError, match="start the server"):
        captioner(torch.rand(1, 3, 8, 8), "q")


# ---------------------------------------------------------------- the reward


def test_alignment_reward_is_recall_against_the_prompt_and_logs_f1(server, bertscore):
    config = RewardConfig(
        name="prompt_alignment",
        captioner_url=server.url,
        reference_template="{prompt}",
        batch_size=2,
    )
    reward = PromptAlignmentReward(config, torch.float32, scorer=bertscore)
    prompts = ["a cat riding a bike", "a dog playing chess", "a fox riding a bike"]
    values = reward(torch.rand(3, 3, 8, 8), prompts)
    assert values.shape == (3,)
    assert values[0].item() == pytest.approx(1.0, abs=1e-5)  # the answer is the prompt
    assert values[1] < 0.99
    extras = reward.extra_metrics()
    assert set(extras) == {"reward_precision", "reward_f1"}
    assert reward.extra_metrics() == {}  # reset for the next epoch


def test_prompt_sets_of_the_alignment_task():
    prompts = load_prompts("nouns_activities")
    assert len(prompts) == 135 and prompts[0] == "a cat washing the dishes"
    held_out = load_prompts("nouns_activities_heldout")
    train_animals = {p.split()[1] for p in prompts}
    assert held_out and all(p.split()[1] not in train_animals for p in held_out)
    assert load_preset("prompt-alignment").prompts.source == "nouns_activities"


# ---------------------------------------------------------------- the local captioner


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tiny import save_tiny_vlm

    folder = tmp_path_factory.mktemp("vlm")
    save_tiny_vlm(folder)
    return folder


def test_local_captioner_answers_each_image_greedily(tiny_vlm):
    from lowvram_ddpo.rewards.captioners import LocalCaptioner

    captioner = LocalCaptioner.from_pretrained(str(tiny_vlm), torch.float32, max_tokens=5)
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    answers = captioner(images, "what is going on in this image ?")
    assert len(answers) == 3 and all(answers)
    assert all(len(a.split()) <= 5 for a in answers)  # word-level tokens: at most max_tokens
    alone = [captioner(image[None], "what is going on in this image ?")[0] for image in images]
    assert answers == alone  # greedy, and batching does not change an answer


def test_local_captioner_in_the_alignment_reward_is_offloadable(tiny_vlm, bertscore):
    config = RewardConfig(
        name="prompt_alignment", captioner="local", captioner_model=str(tiny_vlm), batch_size=2
    )
    reward = PromptAlignmentReward(config, torch.float32, scorer=bertscore)
    assert set(reward.module) == {"bertscore", "captioner"}  # both move to the GPU to score
    values = reward(torch.rand(3, 3, 16, 16), ["a cat", "a dog", "a cat riding a bike"])
    assert values.shape == (3,) and torch.isfinite(values).all()
    with pytest.raises(UserError, match="captioner_4bit needs a CUDA GPU"):
        PromptAlignmentReward(
            RewardConfig(
                name="prompt_alignment",
                captioner="local",
                captioner_model=str(tiny_vlm),
                captioner_4bit=True,
            ),
            torch.float32,
            scorer=bertscore,
        )


def test_memory_estimate_covers_the_local_captioner_and_its_4_bit_form(tiny_vlm):
    from lowvram_ddpo.config import apply_overrides
    from lowvram_ddpo.memory.estimate import estimate_memory

    def reward_phase(*overrides: str):  # noqa: ANN202
        config = load_preset("prompt-alignment")
        apply_overrides(config, list(overrides))
        return estimate_memory(config, "sd15").phase("reward")

    remote = reward_phase()
    local = ["reward.captioner='local'", f"reward.captioner_model='{tiny_vlm}'"]
    fp16 = reward_phase(*local)
    nf4 = reward_phase(*local, "reward.captioner_4bit=true")
    # the remote setup holds only the BERTScore encoder (roberta-large, 355 M, fp16)
    assert 0.6e9 < remote.held["reward model"] < 0.75e9
    assert fp16.held["reward model"] > remote.held["reward model"]
    assert nf4.held["reward model"] < fp16.held["reward model"]
    assert fp16.peak_allocated > remote.peak_allocated  # the VLM's prefill and KV cache


def test_llava_1_5_7b_is_estimated_offline_and_vram_shrinks_the_scoring_batch():
    """The paper's captioner family at 7 B, from transformers' documented LlavaConfig
    defaults: 4-bit weights ~4.4 GB on the card while scoring; `--vram 8GB` keeps it by
    scoring one image at a time (the KV cache of 8 prefills is the rest)."""
    from lowvram_ddpo.config import apply_overrides
    from lowvram_ddpo.memory.calibration import CUDA_CONTEXT_BYTES
    from lowvram_ddpo.memory.estimate import estimate_memory
    from lowvram_ddpo.memory.fit import fit_to_vram
    from lowvram_ddpo.memory.units import GB

    config = load_preset("prompt-alignment")
    apply_overrides(
        config,
        [
            "reward.captioner='local'",
            "reward.captioner_model='llava-hf/llava-1.5-7b-hf'",
            "reward.captioner_4bit=true",
        ],
    )
    reward = estimate_memory(config, "sd15").phase("reward")
    assert 3.8 * GB < reward.held["reward model"] < 5 * GB  # 7 B in nf4 + fp16 embeddings
    assert reward.peak_reserved > 8 * GB  # scoring 8 images at once
    fit = fit_to_vram(config, "sd15", 8 * GB)
    assert fit.config.reward.batch_size < 8
    assert any(change.startswith("reward.batch_size 8 -> ") for change in fit.changes)
    assert fit.report.peak_bytes <= 8 * GB - CUDA_CONTEXT_BYTES


def test_the_stand_in_alignment_reward_scores_on_a_real_device(tiny_vlm, tmp_path):
    """What the measured bench scores with: random weights, the VLM's prefill and the
    BERTScore encoder's pass, finite [B] values (meaningless ones)."""
    from transformers import RobertaConfig

    from lowvram_ddpo.config import RewardConfig
    from lowvram_ddpo.rewards import reward_with_random_weights

    RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    ).save_pretrained(tmp_path / "encoder")
    config = RewardConfig(
        name="prompt_alignment",
        captioner="local",
        captioner_model=str(tiny_vlm),
        bertscore_model=str(tmp_path / "encoder"),
        batch_size=2,
    )
    stand_in = reward_with_random_weights(config, torch.float32, "cpu")
    scores = stand_in(torch.rand(3, 3, 32, 32), ["a cat"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
