#!/usr/bin/env bash
# The GPU checks of the open issues as one device call each, most important first, sized
# to a session's device time (15 minutes, 10 per call, a minute or two to start):
#
#   bash benchmarks/gpu_session.sh confirm   # issue 12: the reference and Inductor's row side by side
#   bash benchmarks/gpu_session.sh equal     # issue 12: the reference and its own settings, ours compiled
#   bash benchmarks/gpu_session.sh speed     # issue 12: beside the reference, same call
#   bash benchmarks/gpu_session.sh speed2    # issue 12: checkpointing, graphs as shipped, profile
#   bash benchmarks/gpu_session.sh speed3    # issue 12: checkpointing + graphs fixed? half norms
#   bash benchmarks/gpu_session.sh rlcm      # issue 12's RLCM goal: as written, fitted, 8 GB
#   bash benchmarks/gpu_session.sh graphs    # issue 12: CUDA graphs reading the weights in place
#   bash benchmarks/gpu_session.sh fp8       # issue 12: an fp8 base (SDXL in 8 GB, SD 1.5 in 6)
#   bash benchmarks/gpu_session.sh compile   # issue 12: Inductor's modes (minutes to compile)
#   bash benchmarks/gpu_session.sh memory    # issues 11, 14: nf4, SDXL, SD 3.5, FLUX.2 rows
#   bash benchmarks/gpu_session.sh others    # issue 12's other goals: RLCM, SDXL (and SD 3.5)
#   bash benchmarks/gpu_session.sh dry       # the same machinery on the CPU (pocket model)
#
# Run from the checkout's root on the device machine. What each part carries (prepare it
# here first; docs/benchmarks.md, "For the first session lent a GPU", has the lines):
#   speed:   .whl (diffusers, importlib_metadata) and .ref (../shared/reference-bench);
#            no bitsandbytes (the tree must stay under 64 MiB): the runs use AdamW
#   speed2:  .whl (diffusers, importlib_metadata)
#   speed3:  .whl (diffusers, importlib_metadata)
#   rlcm:    .whl (diffusers, importlib_metadata)
#   graphs:  .whl (diffusers, importlib_metadata)
#   fp8:     .whl (diffusers, importlib_metadata)
#   confirm: .whl (diffusers, importlib_metadata) and .ref (../shared/reference-bench)
#   equal:   .whl (diffusers, importlib_metadata) and .ref (../shared/reference-bench)
#   compile: .whl (diffusers, importlib_metadata)
#   memory:  .whl (diffusers, importlib_metadata, bitsandbytes)
#   others:  .whl (diffusers, importlib_metadata)
#
# Every stage has its own time cap and the part a deadline (GPU_SESSION_BUDGET_S, 570 s by
# default: under the 10-minute limit of a call); a stage that would start too late is
# skipped and said so. GPU_SESSION_SKIP=name,name skips stages an earlier call ran (a
# second call on the warm machine runs the rest). Results go to $OUT as they come, so a cut-off call still returns
# them: results.jsonl (a JSON line per stage: its command, exit code, seconds and the
# JSON it printed) and session.log (everything the stages wrote). The summary at the end
# is one line per stage.
set -uo pipefail
part="${1:-}"
OUT="${OUT:-/tmp/gpu-session-out}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/session.log"
START=$(date +%s)
DEADLINE=$((START + ${GPU_SESSION_BUDGET_S:-570}))
MIN_STAGE=${GPU_SESSION_MIN_STAGE_S:-45} # and at least half its cap: less measures nothing
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "[gpu_session $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# Inductor's compiled kernels (the trainer's cache folder, speed/compile.py): a bare
# machine compiles SD 1.5 for ~260-290 s per shape set; a cache carried from the last
# session (.compile-cache/torch-compile.tgz.part-NN, git-ignored; carry ".compile-cache")
# may skip part of it (how much is unmeasured: 2026-11-26, a warm machine's second run
# did not finish its warm-up epoch in 200 s: likely its checkpointed training graph, 144
# of 212 s of compile, which bypassed the cache on CUDA until 2026-11-27, speed/compile_cache.py; the cache
# carried from 2026-11-27 holds only sampling graphs). Each GPU part's end packs the cache into
# $OUT in parts of at most 15 MiB (a file coming back from $OUT holds at most 16 MiB).
COMPILE_CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/lowvram-ddpo"
CARRIED_CACHE=.compile-cache/torch-compile.tgz
# the device tool's 64 MiB (67.1 MB) counts the working tree too: 16.5 MB of tracked files
# (2026-11-27) + .ref (19.1) + .whl (6.4) leave 25 MB; 35 did not fit beside .ref then
CACHE_RETURN_MB=${GPU_SESSION_CACHE_MB:-24}
CACHE_PART=15M

restore_compile_cache() {
  compgen -G "$CARRIED_CACHE.part-*" >/dev/null || return 0
  mkdir -p "$COMPILE_CACHE_ROOT"
  if cat "$CARRIED_CACHE".part-* | tar xz -C "$COMPILE_CACHE_ROOT"; then
    say "compile cache restored from $CARRIED_CACHE.part-* ($(du -sh "$COMPILE_CACHE_ROOT/torch-compile" | cut -f1))"
  else # parts of two sessions mixed, say: compile from scratch, and say so
    rm -rf "$COMPILE_CACHE_ROOT/torch-compile"
    say "compile cache: restoring $CARRIED_CACHE.part-* failed (parts of two sessions?): compiling from scratch"
  fi
}

# Over the limit, the cache is packed again without triton/: Inductor's FX graph entries
# bundle the Triton kernels they launch (torch's bundle_triton_into_fx_graph_cache, on by
# default) and write them back on a hit, so the entries alone restore a whole compiled
# graph (2026-11-27's parts: triton/ 140 MB of 183 unpacked, the one FX entry 43)
pack_compile_cache() {
  [ -d "$COMPILE_CACHE_ROOT/torch-compile" ] || return 0
  local packed=/tmp/torch-compile.tgz what="" mb
  tar czf "$packed" -C "$COMPILE_CACHE_ROOT" torch-compile 2>>"$LOG" || { rm -f "$packed"; return 0; }
  mb=$(($(stat -c %s "$packed") / 1048576))
  if ((mb > CACHE_RETURN_MB)); then
    tar czf "$packed" -C "$COMPILE_CACHE_ROOT" --exclude=torch-compile/triton torch-compile \
      2>>"$LOG" || { rm -f "$packed"; return 0; }
    say "compile cache: ${mb} MB packed, over ${CACHE_RETURN_MB} MB: packed again without triton/"
    mb=$(($(stat -c %s "$packed") / 1048576))
    what=" (without triton/)"
  fi
  if ((mb > CACHE_RETURN_MB)); then
    say "compile cache: ${mb} MB packed${what}, over ${CACHE_RETURN_MB} MB: not returned"
  else
    split -b "$CACHE_PART" -d "$packed" "$OUT/torch-compile.tgz.part-"
    say "compile cache: ${mb} MB${what} in \$OUT/torch-compile.tgz.part-* (replace .compile-cache/'s parts with them)"
  fi
  rm -f "$packed"
}

install_wheels() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    say "no .whl/*.whl: carry the wheels (diffusers at least); see the header of $0"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheel install failed"; exit 2; }
  export PYTHONPATH="/tmp/site:$PWD"
  restore_compile_cache
  PACK_CACHE=1 # a GPU part: what it compiled goes back
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >>"$LOG" 2>&1
  "$PY" -c 'import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for p in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "missing")' 2>&1 | tee -a "$LOG"
}

# stage NAME CAP_SECONDS COMMAND...: run COMMAND (its stdout is its result: JSON, or JSON
# lines) for at most CAP seconds, or skip it when the part's deadline is too near
stage() {
  local name=$1 cap=$2
  shift 2
  if [[ ",${GPU_SESSION_SKIP:-}," == *",$name,"* ]]; then # done in an earlier call
    say "$name: skipped (GPU_SESSION_SKIP)"
    echo "{\"stage\": \"$name\", \"skipped\": \"GPU_SESSION_SKIP\"}" >>"$RESULTS"
    return 0
  fi
  local left=$((DEADLINE - $(date +%s))) need=$((cap / 2 > MIN_STAGE ? cap / 2 : MIN_STAGE))
  if ((left < need)); then
    say "$name: skipped, ${left} s left"
    echo "{\"stage\": \"$name\", \"skipped\": \"the part's deadline\"}" >>"$RESULTS"
    return 0
  fi
  ((cap > left)) && cap=$left
  say "$name (at most ${cap} s): $*"
  local t0 rc out="/tmp/stage-$name.out"
  t0=$(date +%s)
  : >"$out"
  # through bash -c: the command may be one of the functions below (exported); appending,
  # so a script that also writes to /dev/stdout (gpu_checks --json-out) cannot overwrite
  timeout --kill-after=10 "$cap" bash -c '"$@"' "$name" "$@" >>"$out" 2>>"$LOG"
  rc=$?
  "$PY" - "$name" "$rc" "$(($(date +%s) - t0))" "$out" "$*" >>"$RESULTS" 2>>"$LOG" <<'EOF'
import json, sys
name, rc, seconds, path, command = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
text = open(path, errors="replace").read()
decoder, found, at = json.JSONDecoder(), [], 0
while (at := text.find("{", at)) >= 0:  # every JSON object in the output, text around them
    try:
        value, end = decoder.raw_decode(text, at)
    except ValueError:
        at += 1
        continue
    found.append(value)
    at = end
result = found[0] if len(found) == 1 else (found or None)
row = {"stage": name, "command": command, "rc": rc, "seconds": seconds, "result": result}
if result is None or rc != 0:  # a cut-off stage's last words say where it was
    row["output_tail"] = text[-3000:]
print(json.dumps(row))
EOF
  say "$name: exit $rc after $(($(date +%s) - t0)) s"
  return "$rc"
}

bench_speed() { "$PY" -m lowvram_ddpo.cli bench speed --json "$@"; }

# the reference's default run (its dgx.py:compressibility settings), then its JSON
reference() {
  if [ ! -f .ref/run_ref.sh ]; then
    echo "no .ref/: copy ../shared/reference-bench to .ref/ and carry it" >&2
    return 2
  fi
  # its own stack (diffusers 0.17, transformers 4) only: not ours on PYTHONPATH
  rm -f /tmp/ref-out/ref.json # a warm machine's earlier result must not pass for this one
  PYTHONPATH="" REF_RUNS=default REF_RUN_TIMEOUT="$1" OUT=/tmp/ref-out bash .ref/run_ref.sh >&2
  cat /tmp/ref-out/ref.json
}

export -f bench_speed reference
export PY

# SD 1.5 at the `incompressibility` preset's algorithm (50 steps, CFG 5, every step
# trained, one sampling batch of 8 images per epoch; eager unless a stage's own --set
# speed.compile follows (the preset compiles with Inductor since 2026-11-26)
SD15=(--preset incompressibility --batches 1 --set memory.optimizer=adamw --set memory.vram=off
  --set speed.compile=off)
# the preset as a user gets it: fitted to the card it runs on (its memory.vram = "auto")
SD15_AUTO=(--preset incompressibility --batches 1 --set memory.optimizer=adamw)
# (bench speed shrinks the optimiser step to its 8 images; these keep it valid before)
MB8_CKPT=(--set train.batch_size=8 --set train.gradient_accumulation_steps=8
  --set memory.gradient_checkpointing=true)
EQUAL=(--set train.batch_size=4 --set train.gradient_accumulation_steps=16
  --set memory.offload=false) # the reference's micro-batch 4, nothing offloaded
# the preset fitted to peak at most 6 GiB (a 7 GB card less its CUDA context), Inductor:
# micro-batch 8, checkpointing with the 8x8 level kept out, nothing offloaded, 4 images
# per decode (5.81 GiB estimated; predicted 0.778 samples/s on an H100, 3.15x the
# reference's 0.247, against 0.744 for the explicit micro-batch-8 row)
VRAM7=(--preset incompressibility --batches 1 --set memory.optimizer=adamw --vram 7GB)

case "$part" in
  confirm) # issue 12's first goal (3x the reference's samples/s within 6 GiB) side by side
    # in one call: the reference, then the fastest settings the fit finds within 6 GiB
    # (VRAM7; the explicit micro-batch-8 row of 2026-11-26 gave 0.746 samples/s in 4.74
    # GiB on an H100, 3.02x the reference of the day before); a cold compile took 290 s
    # there. Carries .whl and .ref
    install_wheels
    # (the reference took 130 s on an H100; our row 319 s with a cold compile, 262 of it
    # the warm-up epoch: run the part with GPU_SESSION_BUDGET_S=575 and a 600 s call).
    # 2026-11-26 late and 2026-11-27: 2.99-3.01x side by side, but the timed epoch
    # reserved 7.21 GiB (5.59 allocated) inside sampling, which then held the decode:
    # since then the decode is a phase of its own and every phase starts on a released
    # cache (the summary line gives each phase's peaks). Two epochs: the profile of a
    # third (--epochs 3 --profile FILE, ~80 s more) ran on 2026-11-27
    stage reference 160 reference 140
    # the VAE's decode alone at 1, 2, 4 and 8 images per call, under autocast as the
    # trainer runs it: its working memory measured beside the estimate's (is the ~1.1 GiB
    # the estimate missed in sampling+decode the decode's? cuDNN's workspace?), no compile
    # (and since 2026-11-27 fifth session each width outside autocast too, speed.half_decode:
    # seconds of decoding, not of building the model)
    stage decode-batch 90 "$PY" benchmarks/decode_batch.py --arch sd15 --repeats 3 \
      --variants eager,half
    # three timed epochs since 2026-11-27 sixth session: one epoch (8 images) gave 0.797,
    # 0.843 and 0.813 samples/s in three runs of these settings on one H200 (2.88-3.05x)
    stage vram7-default 440 bench_speed "${VRAM7[@]}" --epochs 4
    ;;
  equal) # issue 12's second goal: at the reference's own settings (micro-batch 4, nothing
    # offloaded) at least 3x its samples/s, side by side in one call. CUDA graphs over
    # Inductor's kernels first (predicted 3.70x by the time model; measured 3.63x on an
    # H100, 2026-11-27: skip it with GPU_SESSION_SKIP=equal-reduce-overhead), then the
    # preset fitted to the big card and Inductor alone at equal settings (2.75x
    # predicted) if time is left; each a cold compile (~250-300 s) and three timed
    # epochs. Carries .whl and .ref
    install_wheels
    stage reference 160 reference 140
    stage equal-reduce-overhead 400 bench_speed "${SD15[@]}" "${EQUAL[@]}" \
      --set speed.compile=reduce-overhead --epochs 4
    # then the issue's MFU goal (training 30%, sampling 40% on an H100): the preset as
    # the fit gives it on this big card (micro-batch 8 without checkpointing, nothing
    # offloaded, Inductor: no recomputation, the time model's Inductor training rate is
    # ~31% of the listed one), never run; its own cold compile
    stage auto-default 400 bench_speed "${SD15_AUTO[@]}" --epochs 4
    stage equal-default 330 bench_speed "${SD15[@]}" "${EQUAL[@]}" --set speed.compile=default \
      --epochs 4
    ;;
  speed)
    install_wheels
    # the reference's own run limit leaves room for its wheels and its model's build
    stage reference 300 reference 210
    stage mb8-ckpt 180 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}"
    # if CUDA graphs fail beside expandable segments (the CLI's allocator setting), once
    # more without them (not after a time-out: that would only take the next stages' time)
    stage mb8-ckpt-cudagraphs 180 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" --set speed.compile=cudagraphs
    rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False stage mb8-ckpt-cudagraphs-plain-allocator 180 \
        bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" --set speed.compile=cudagraphs
    fi
    stage replay-cudagraphs 150 "$PY" benchmarks/replay_error.py --arch sd15 --compile cudagraphs --steps 10
    stage equal-cudagraphs 150 bench_speed "${SD15[@]}" "${EQUAL[@]}" --set speed.compile=cudagraphs
    stage replay-off 90 "$PY" benchmarks/replay_error.py --arch sd15 --compile off --steps 10
    stage equal 150 bench_speed "${SD15[@]}" "${EQUAL[@]}"
    stage shipped-eager 240 bench_speed "${SD15[@]}" # the preset as written before Inductor
    ;;
  speed2) # what the first speed call (H200, 2026-11-26) left open, most telling first:
    # the new checkpointing's peak; the preset fitted to the card with CUDA graphs (the
    # default to choose); where a UNet call's
    # time goes (host or which kernels; the fused LoRA's gain); the fused LoRA's replay
    # error; checkpointing + graphs again with logs (its first epoch alone took 126 s
    # there: setup ~23 s + that + a timed epoch did not fit 180 s)
    install_wheels
    # attention layers now checkpointed whole: the peak (estimated 5.09 GiB, was 6.12
    # measured) and the time of the same row as the first call's
    stage mb8-ckpt 120 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}"
    stage auto-cudagraphs 200 bench_speed "${SD15_AUTO[@]}" --set speed.compile=cudagraphs
    # a JSON line per variant as it ends: what a cut-off stage had still comes back
    stage profile 150 "$PY" benchmarks/unet_profile.py --arch sd15 \
      --variants eager,no-lora,fused-lora,channels_last,cudagraphs
    stage replay-fused-lora 90 "$PY" benchmarks/replay_error.py --arch sd15 --fused-lora --steps 10
    # the shipped preset's replay: sampled 8 at a time, re-scored one at a time (other kernels)
    stage replay-shipped 90 "$PY" benchmarks/replay_error.py --arch sd15 --steps 10 --batch 8 \
      --micro-batch 1
    TORCH_LOGS=recompiles,cudagraphs,perf_hints stage mb8-ckpt-cudagraphs-logged 220 \
      bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" --set speed.compile=cudagraphs
    ;;
  speed3) # what the H100 call (2026-11-26) found: is checkpointing + CUDA graphs fixed (the
    # dynamo split at each attention layer), and do the half-precision norms pay? Most
    # telling first: the caps add to ~1,530 s, two or three calls' worth
    install_wheels
    # the product's fast-and-small row: its graph breaks logged, three epochs (the growth
    # of the peak after the first epoch, 1.0-1.4 GiB so far: does it stop?)
    # (2026-11-26 on an H100: no break or recompilation logged, yet its second epoch did not
    # end in 105 s: cudagraph trees' own log says why a graph is recorded again)
    TORCH_LOGS=graph_breaks,recompiles,cudagraphs stage mb8-ckpt-cudagraphs 230 bench_speed "${SD15[@]}" \
      "${MB8_CKPT[@]}" --set speed.compile=cudagraphs --epochs 3
    # the same eager with this call's code (the offloaded visits copy in only, prompts
    # encoded before the first epoch): the like-for-like base of the row above
    stage mb8-ckpt 100 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}"
    stage replay-half-norms 60 "$PY" benchmarks/replay_error.py --arch sd15 --half-norms --steps 10
    stage mb8-ckpt-half-norms 100 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" --set speed.half_norms=true
    # the norms: kernels by kind and the costliest by name, with and without
    # (and which kernels the graphs add: 9 ms of "other" per training call on the H100)
    stage profile-half-norms 150 "$PY" benchmarks/unet_profile.py --arch sd15 \
      --variants eager,half-norms,channels_last+half-norms,cudagraphs --repeats 5
    # an offloaded VAE's and text encoder's visit: the old round trip against the copy in
    # from pinned memory (seconds; the sampling phase's offload cost, 12% on the H200)
    stage offload-visit 60 "$PY" benchmarks/offload_visit.py --arch sd15
    # 8 images decoded 1, 2, 4 and 8 per VAE call (memory.decode_batch, which --vram widens)
    stage decode-batch 60 "$PY" benchmarks/decode_batch.py --arch sd15
    # how a call's time grows with its batch (2-16 latents), eager and graphed: the time
    # model's one rate at every batch is optimistic below ~8 latents (RLCM's micro-step: 2)
    stage batch-curve 180 "$PY" benchmarks/unet_profile.py --arch sd15 --variants eager,cudagraphs \
      --sweep 1,2,4,8 --repeats 5
    # the reference's own shapes (sampling 8, training 4): do its ratios start off 1 too?
    stage replay-8-4 60 "$PY" benchmarks/replay_error.py --arch sd15 --steps 10 --batch 8 \
      --micro-batch 4
    # what --vram 8GB picks with graphs (micro-batch 1, nothing offloaded: 6.95 GiB; 15 min
    # per epoch predicted with the floor under graphed calls: the floor at one image)
    stage vram8-cudagraphs 200 bench_speed --preset incompressibility --batches 1 \
      --set memory.optimizer=adamw --vram 8GB --set speed.compile=cudagraphs --epochs 3
    stage sdxl 330 bench_speed --preset sdxl-aesthetic --batches 1 --set memory.optimizer=adamw \
      --set memory.vram=off
    ;;
  rlcm) # issue 12's RLCM goal (3x today's epoch), like for like in one call: the preset as
    # written eager (today's), as the fit gives it on this card (memory.vram = "auto":
    # since 2026-11-27 Inductor's kernels at sampling 16 and micro-batch 16 in place of
    # its CUDA graphs, ~15 s per epoch predicted; a cold compile), as an 8 GB card gets it
    # (the same with checkpointing, ~19 s predicted), and with the preset's CUDA graphs
    # kept (2.34 samples/s measured 2026-11-26: the fit's choice before); then an epoch
    # profiled. Caps ~1,670 s: three calls (each next GPU_SESSION_SKIP=<stages done>)
    install_wheels
    RLCM=(--preset rlcm-incompressibility --set memory.optimizer=adamw)
    # (the decoder eager too: the preset compiles it since 2026-11-27 sixth session)
    stage rlcm-written-eager 150 bench_speed "${RLCM[@]}" --batches 4 --set memory.vram=off \
      --set speed.compile=off --set speed.compile_decoder=false --epochs 3
    stage rlcm-auto 450 bench_speed "${RLCM[@]}" --batches 2 --epochs 3
    stage rlcm-vram8 300 bench_speed "${RLCM[@]}" --batches 2 --vram 8GB --epochs 3
    # the decode is a large share of RLCM's sampling: rlcm-auto compiles the VAE's decoder
    # (the preset's speed.compile_decoder since 2026-11-27 sixth session: ~10% of the
    # epoch predicted on an H100); the fitted row with it eager, its decoding seconds
    # against rlcm-auto's (the decode's own compile is in the cache by then)
    stage rlcm-auto-eager-decoder 300 bench_speed "${RLCM[@]}" --batches 2 --epochs 3 \
      --set speed.compile_decoder=false
    # and decoded outside autocast (speed.half_decode; nothing compiles anew)
    stage rlcm-auto-half-decode 200 bench_speed "${RLCM[@]}" --batches 2 --epochs 3 \
      --set speed.half_decode=true
    stage rlcm-graphs 150 bench_speed "${RLCM[@]}" --batches 2 --epochs 3 \
      --set speed.compile=cudagraphs
    # where the graphed sampling of the preset as written spent ~0.4 s per batch outside
    # its UNet calls (before the offloaded visits lost their copy out and the prompts were
    # encoded up front): the last epoch profiled. A hypothesis to check there and in
    # rlcm-graphs' "graphs recorded per epoch": on 2026-11-26 graphs cut training 0.65 ->
    # 0.25 s per image but sampling only 0.19 -> 0.17, as if its calls did not replay
    stage rlcm-profile 120 bench_speed "${RLCM[@]}" --batches 2 --set memory.vram=off \
      --profile "$OUT/rlcm-profile.txt"
    ;;
  graphs) # speed.compile=cudagraphs' graphs read the UNet's weights in place since
    # 2026-11-27 (speed/cudagraphs_backend.py): torch's own backend copied every weight into
    # the graphs' pool before each replay. Profiled on an H100 (2026-11-27, eighth session:
    # 2,733 kernels and 82.1 ms per sampling call, 6,147 and 115.2 ms per training call,
    # against torch's 3,675/91.5 and 7,089/122.0 the day before); its 90 s stages were
    # too short for anything else (torch's backend still recording at 90 s, the RLCM row's
    # training call compiled at ~70 s). Most telling first: the RLCM row as the H100 ran it
    # with torch's backend (2.343 samples/s: sampling 0.165, training 0.249 s per image,
    # 6.50 GiB; the issue's RLCM goal), DDPO with its sampling graphed too, then torch's
    # backend profiled on the same machine. Caps ~520 s in all: one call
    install_wheels
    stage rlcm-graphs-written 170 bench_speed --preset rlcm-incompressibility --batches 1 \
      --set memory.optimizer=adamw --set memory.vram=off --set speed.compile=cudagraphs \
      --set speed.compile_decoder=false --epochs 3
    # DDPO's sampling replayed too: judged no faster on the H200 (2026-11-26, 0.474 against
    # 0.469 s per image at micro-batch 4, nothing offloaded) with the weights copied each
    # replay; the same settings with them read in place
    stage equal-graphs-sampling 200 bench_speed "${SD15[@]}" "${EQUAL[@]}" \
      --set speed.compile=cudagraphs --set speed.graph_sampling=true --epochs 3
    stage profile-torch-graphs 150 "$PY" benchmarks/unet_profile.py --arch sd15 \
      --variants eager,torch-cudagraphs --repeats 5
    ;;
  fp8) # memory.quantize=fp8 (the base in 8 bits, dequantised per call): SDXL's 2x within
    # 8 GB with CUDA graphs on its host-bound training (6.64 GiB, ~2 h 13 per epoch
    # predicted against 5 h 2 at 16 bits eager), then as --vram 8GB fits it eager
    # (micro-batch 2: 6.81 GiB, ~3 h 10), its replay on the GPU, SD 1.5's checkpointing +
    # CUDA graphs (7.33 GiB estimated at 16 bits, 6.57 with fp8: the 6 GiB goal's
    # distance), and what the dequantisation costs a call. Caps ~1,100 s: two calls
    install_wheels
    stage sdxl-fp8-cudagraphs 330 bench_speed --preset sdxl-aesthetic --batches 1 \
      --set memory.optimizer=adamw --vram 8GB --set memory.quantize=fp8 \
      --set speed.compile=cudagraphs
    stage sdxl-fp8-vram8 330 bench_speed --preset sdxl-aesthetic --batches 1 \
      --set memory.optimizer=adamw --vram 8GB --set memory.quantize=fp8
    stage replay-fp8 60 "$PY" benchmarks/replay_error.py --arch sd15 --fp8 --steps 10
    stage mb8-ckpt-cudagraphs-fp8 230 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" \
      --set speed.compile=cudagraphs --set memory.quantize=fp8 --epochs 3
    stage profile-fp8 150 "$PY" benchmarks/unet_profile.py --arch sd15 \
      --variants eager,fp8,cudagraphs,cudagraphs+fp8 --repeats 5
    ;;
  compile) # each row compiles minutes: expect the first one or two per call. Its first
    # stage ran on an H100 (2026-11-26: 0.746 samples/s, 4.74 GiB, replay 7e-6); right
    # after a `confirm` call, GPU_SESSION_SKIP=mb8-ckpt-default,blocks-default starts
    # with the `confirm` row from the compile cache, then the equal-settings goal's
    # candidate, then channels-last (blocks-default ran on 2026-11-27; vram7-cached,
    # decode-compiled and vram7-decoder on an H200, 2026-11-27 sixth session: skip them
    # too)
    install_wheels
    stage mb8-ckpt-default 450 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" --set speed.compile=default
    # the `confirm` part's row compiled by blocks (speed.compile_scope=blocks: each
    # attention layer and resnet apart, each shape once): its warm-up epoch against the
    # whole UNet's 262 s, its timed epoch against 0.757 samples/s (the compile lines in
    # session.log say each call's seconds); its replay is the run's own. (Where Inductor's
    # epoch goes, the profile, is the `confirm` part's third epoch since 2026-11-26 late)
    stage blocks-default 330 bench_speed "${VRAM7[@]}" --set speed.compile_scope=blocks
    # the `confirm` part's row again, its compile now in the cache: until 2026-11-27 the
    # checkpointed training graph was never cached on CUDA (its compile line looked up no
    # graph: torch 2.11's graph-safe RNG wrapper around the recomputed attention is not
    # cacheable; speed/compile_cache.py). Expected: "2 of 2 graphs from the compile cache"
    # on the training line and a warm-up epoch well under the cold 233 s (the CPU: 121 ->
    # 11 s); "could not take" there means the fix did not take on this torch. Needs the
    # machine the `confirm` call warmed (run at once) or its returned cache parts carried.
    # Ran on an H200 (2026-11-27 sixth session): 3 of 3 Inductor graphs and 2 of 2 AOT
    # entries from the cache, warm-up 45 s against the cold 245 s
    stage vram7-cached 200 bench_speed "${VRAM7[@]}"
    # speed.compile_decoder (2026-11-27, CPU only): the VAE's decode alone, eager and
    # compiled at 2 and 4 images per call (ms per image, first call = the compile, peak,
    # pixels apart); then the row above with it, the UNet's graphs from the cache: its
    # "decoding" seconds against vram7-cached's, its sampling phase's peak. Ran on an H200
    # (2026-11-27 sixth session): 10.06 and 8.96 ms per image against eager's 24.26 and
    # 20.96, 0.64 and 1.26 GiB working against 1.80 and 3.51; in the row decoding 0.07 s
    # against 0.18, its phase 2.74 GiB reserved against 4.14
    stage decode-compiled 180 "$PY" benchmarks/decode_batch.py --arch sd15 \
      --variants eager,half,compiled --widths 2,4 --repeats 3
    stage vram7-decoder 250 bench_speed "${VRAM7[@]}" --set speed.compile_decoder=true
    # speed.half_decode: the decode outside autocast (diffusers' fp16 numerics; 0.60 of
    # autocast's working memory on the meta device), so the 7 GB fit decodes 4 images per
    # call, not 2 (decode phase 4.61 GB reserved estimated, 4.21 before): its decoding
    # seconds and peaks against vram7-cached's; nothing compiles anew
    stage vram7-half-decode 150 bench_speed "${VRAM7[@]}" --set speed.half_decode=true
    # the issue's "equal settings" goal (the reference's micro-batch 4, nothing offloaded)
    # with CUDA graphs over Inductor's kernels (no launches left): predicted 0.318
    # + 0.777 s per image, 3.70x the reference's 0.247 samples/s, against default's 2.75x
    # (the time model: Inductor's rate, the graphed call's floor; never run); its replay
    # is the run's own (the epoch line), beside replay-reduce-overhead's below
    stage equal-reduce-overhead 450 bench_speed "${SD15[@]}" "${EQUAL[@]}" \
      --set speed.compile=reduce-overhead --epochs 3
    # 2026-11-27 (H100, the whole UNet): blocks cut the warm-up 233 -> 158 s but the timed
    # epoch +12%; the profile found cuDNN turning NCHW to NHWC and back around every
    # convolution (6.3% of the kernels' time; Inductor keeps SD's training graph NCHW).
    # The same row with the frozen convolution weights channels-last: its epoch against
    # 0.779 samples/s, its replay against 6.9e-6, its peak. A cold compile of its own
    stage vram7-channels-last 330 bench_speed "${VRAM7[@]}" --set speed.channels_last=true
    # memory.keep_attention (2026-11-27, CPU only): the 8 GB fit is the `confirm` part's
    # 7 GB row (micro-batch 8, the 8x8 level out of checkpointing, 2 images per decode)
    # with checkpointing keeping self-attention's outputs (6.16 GB estimated, +0.35):
    # training predicted ~2% faster (322 against 329 s per 256 images); its replay,
    # training s/img and peak against vram7-default's. Only its training graph compiles
    # anew (the sampling call's is the cached one)
    stage vram8-keep-attention 330 bench_speed "${VRAM7[@]}" --vram 8GB
    # cuDNN's timed choice of convolution algorithms (speed.cudnn_benchmark): its speed,
    # its peak (a larger workspace is not in the estimate) and its replay; cache warm
    stage vram7-cudnn 200 bench_speed "${VRAM7[@]}" --set speed.cudnn_benchmark=true
    # the same with every level checkpointed: what keeping the 8x8 level out gave (the
    # time model: 2% of the training); its training graph compiles anew
    stage vram7-levels0 330 bench_speed "${VRAM7[@]}" --set memory.gradient_checkpointing=true \
      --set memory.uncheckpointed_levels=0
    # the preset as a user gets it on this card (Inductor; the fit's batches, no offload)
    stage auto-default 450 bench_speed "${SD15_AUTO[@]}"
    # two of SD 1.5's four levels kept out of checkpointing (memory.uncheckpointed_levels;
    # 7.87 GiB estimated): the time model predicts 70% of full checkpointing's
    # recomputation, training ~10% faster than the first stage (only the training graph
    # compiles again: the sampling one is in the cache)
    stage mb8-levels2-default 330 bench_speed "${SD15[@]}" "${MB8_CKPT[@]}" \
      --set memory.uncheckpointed_levels=2 --set speed.compile=default
    # the issue's "equal settings" goal: the reference's micro-batch 4, nothing offloaded
    stage equal-default 450 bench_speed "${SD15[@]}" "${EQUAL[@]}" --set speed.compile=default
    # compiles a sampling and a training graph at batch 2: more than 176 s on the H100
    stage replay-default 400 "$PY" benchmarks/replay_error.py --arch sd15 --compile default --steps 10
    stage replay-reduce-overhead 300 "$PY" benchmarks/replay_error.py --arch sd15 --compile reduce-overhead --steps 10
    # SDXL's training is host-bound at micro-batch 1 (~0.9 s per checkpointed call, ~0.28
    # of arithmetic): Inductor's fused kernels, without a graph pool, stay in its 8 GB
    # (6.90 GiB estimated, as eager) and are predicted at 2 h 19 min per epoch against 5 h
    # 2 eager (the time model with the SD 1.5 row's Inductor factors): the SDXL goal's
    # candidate. Needs a call of its own: GPU_SESSION_SKIP the stages above. First by
    # blocks (speed.compile_scope=blocks: SDXL's attention layers come in 2 shapes and
    # its resnets in a few, so most of its compile is code shared between blocks)
    stage sdxl-blocks-default 540 bench_speed --preset sdxl-aesthetic --batches 1 \
      --set memory.optimizer=adamw --set memory.vram=off --set speed.compile=default \
      --set speed.compile_scope=blocks
    stage sdxl-default 540 bench_speed --preset sdxl-aesthetic --batches 1 \
      --set memory.optimizer=adamw --set memory.vram=off --set speed.compile=default
    # sampled through the training call's graph, Inductor's own roundings: exact by
    # construction on the CPU; the lever if replay-default is not exact on the GPU
    stage replay-training-graph 300 "$PY" benchmarks/replay_error.py --arch sd15 \
      --compile default --steps 10 --fused-roundings --training-graph-sampling
    # the control: Inductor's own roundings (no eager roundings), what the trainer avoids
    # (on the CPU in bf16: ~50 times the clip range); last, it only explains
    stage replay-default-fused-roundings 300 "$PY" benchmarks/replay_error.py --arch sd15 \
      --compile default --steps 10 --fused-roundings
    ;;
  memory)
    install_wheels
    stage sd15 200 "$PY" benchmarks/gpu_checks.py --rows sd15-nf4,sd15-reference --json-out /dev/stdout
    stage flow 240 "$PY" benchmarks/gpu_checks.py --rows sd35m-grpo,flux2-klein,flux2-klein-bf16 --json-out /dev/stdout
    stage replay-sd35m 120 "$PY" benchmarks/replay_error.py --arch sd35m --resolution 512
    stage sdxl 240 "$PY" benchmarks/gpu_checks.py --rows sdxl --json-out /dev/stdout
    ;;
  others) # issue 12's RLCM (3x today's epoch) and SDXL (2x today's image, within 8 GB) goals:
    # each preset eager (today's time), then with CUDA graphs; SD 3.5 if time is left
    install_wheels
    RLCM=(--preset rlcm-incompressibility --batches 1 --set memory.optimizer=adamw --set memory.vram=off)
    SDXL=(--preset sdxl-aesthetic --batches 1 --set memory.optimizer=adamw --set memory.vram=off)
    stage rlcm 120 bench_speed "${RLCM[@]}" --set speed.compile=off # graphs: its preset's default
    stage rlcm-cudagraphs 120 bench_speed "${RLCM[@]}" --set speed.compile=cudagraphs
    stage sdxl 150 bench_speed "${SDXL[@]}"
    stage sdxl-cudagraphs 150 bench_speed "${SDXL[@]}" --set speed.compile=cudagraphs
    stage sd35m 120 bench_speed --preset sd35m-grpo-incompressibility --batches 2 \
      --set memory.optimizer=adamw --set memory.vram=off
    ;;
  dry) # the machinery on the CPU, in seconds: the pocket model, no wheels, no reference
    export PYTHONPATH="$PWD"
    stage bench 100 bench_speed --preset pocket-incompressibility --batches 1 --set sample.num_steps=4
    stage replay-off 100 "$PY" benchmarks/replay_error.py --arch pocket --compile off --steps 3
    stage profile 100 "$PY" benchmarks/unet_profile.py --arch pocket --variants eager --repeats 2
    ;;
  *)
    echo "usage: bash $0 confirm|equal|speed|speed2|speed3|rlcm|graphs|fp8|compile|memory|others|dry (see its header)" >&2
    exit 2
    ;;
esac

[ -n "${PACK_CACHE:-}" ] && pack_compile_cache

# one line per stage: what a reader needs first (with each row's ratio to the reference's
# samples/s where the part ran it)
"$PY" benchmarks/session_summary.py "$RESULTS" | tee -a "$LOG"
