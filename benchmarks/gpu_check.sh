#!/usr/bin/env bash
# GPU check: the tests and figures that only a CUDA machine can give, in one run of under 8 minutes on one GPU.
#
# Usage (from anywhere; the dev environment active, `pip install -e ".[dev]"`):
#   benchmarks/gpu_check.sh [OUT_DIR]            # run it; OUT_DIR defaults to ./gpu_check
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # no GPU needed: check that every command below exists and that
#                                                # pytest collects each selection, then exit 0
# Environment: PYTHON (default: python), and per-step limits in seconds TESTS_S (90), DEVICE_TESTS_S (100),
# SMOKE_S (60), DDP_S (120), STEP_COST_S (180); STEP_COST_ARGS (default "--steps 12 --rounds 3"). On this project's
# 2-core CPU machine the two test steps take 18 s and 35 s and the smoke (on the CPU) 23 s, so the limits only catch
# a hang; with one GPU the limits add up to 430 s, with the DDP step (more than one GPU) to 550 s.
# Note: the repository's tests pin most loaders to the CPU (and the DDP tests use gloo processes on the CPU), so the
# keyword step checks that those paths still hold on a CUDA build with a GPU present; the GPU itself is exercised by
# the device tests, the smoke and step_cost.
#
# What it runs, each step's output kept in OUT_DIR:
#   (a) env.txt            nvidia-smi, torch / CUDA / cuDNN versions, the GPUs torch sees
#   (b) pytest_keyword.txt the tests on fastai's mixed-precision / autocast / distributed-loader paths (selected with
#                          -k below; found by grepping tests/ for cuda, to_fp16, MixedPrecision, autocast, cudnn, distrib)
#       pytest_device.txt  tests whose fastai loaders (`TfmdDL`) default to the GPU when there is one: export/load of
#                          the package's loaders, the CNN proxy, the vision profile
#       cuda_smoke.txt     every rule on CUDA under `to_fp16()`: finite, falling loss; every forward of the fit (training,
#                          the no-grad scoring forward, validation) under CUDA autocast; export, load_learner, predict on CPU
#       pytest_ddp.txt     the DDP tests, only where torch.cuda.device_count() > 1 (they run gloo processes)
#   (c) step_cost.md/.json benchmarks/step_cost.py --device cuda (it synchronizes CUDA around every timed region)
#   (d) summary.txt        every step's exit status and pytest's last line; the script exits 1 if any step failed (a test
#                          failed or a step ran past its limit), 2 if there is no GPU (without --dry-run)
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)"
PY="${PYTHON:-python}"
cd "$REPO"

KEYWORDS="autocast or mixed_precision or fp16 or cuda or cudnn or distributed_dl or distributed_loader \
or after_pred_rewrites or leaves_the_learner_as_plain"
KEYWORD_SEL=(tests -k "$KEYWORDS" --ignore=tests/test_distributed.py --ignore=tests/test_prune_distributed.py)
DEVICE_SEL=(tests/test_export.py tests/test_proxy.py::test_image_batches_get_a_cnn_proxy_and_train
            tests/test_profile.py::test_vision_learner_with_a_proxy)
DDP_SEL=(tests/test_distributed.py tests/test_prune_distributed.py)
read -r -a STEP_COST_ARGS <<< "${STEP_COST_ARGS:---steps 12 --rounds 3}"

write_smoke() {
cat > "$OUT/cuda_smoke.py" <<'EOF'
"Every rule on CUDA under fastai's real MixedPrecision; then export and load_learner (on the CPU) and predict."
import math, tempfile, warnings
from pathlib import Path
import torch
from torch import nn
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.fp16 import MixedPrecision  # noqa: F401 (adds Learner.to_fp16)
from fastai.callback.progress import ProgressCallback  # noqa: F401 (adds Learner.no_bar)
import fastai_hardmine.all  # noqa: F401 (adds Learner.top_k, .batch_loss_filter, .selective_backprop)
from fastai_hardmine.data import digits_dls, digits_data

RULES = {'top_k subset': lambda l: l.top_k(0.5), 'top_k mask': lambda l: l.top_k(0.5, mode='mask'),
         'loss_filter subset': lambda l: l.batch_loss_filter(0.6),
         'selective subset': lambda l: l.selective_backprop(1, seed=0),
         'selective staleness fill': lambda l: l.selective_backprop(1, seed=0, staleness=1, fill_batch=True)}
xv = digits_data()[2]
failed = []
for name, add in RULES.items():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    seen = []  # CUDA autocast on, in every forward of the fit (training, scoring and validation batches)
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled('cuda')))
    learn = add(Learner(digits_dls(bs=64, device='cuda'), model, CrossEntropyLossFlat()).to_fp16())
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2)
        n_fit, loss = len(seen), learn.validate()[0]
    kept = learn.hard_miner.kept.sum().item() / learn.hard_miner.batch_sizes.sum().item()
    ok = math.isfinite(loss) and loss < 1.5 and all(seen[:n_fit])
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.export(Path(d)/'export.pkl')
        loaded = load_learner(Path(d)/'export.pkl')
        with loaded.no_bar(): probs = loaded.predict(xv[0])[2]
    ok = ok and next(loaded.model.parameters()).device.type == 'cpu' and abs(probs.sum().item() - 1) < 1e-3
    print(f"{name}: valid loss {loss:.3f}, kept share {kept:.2f}, {n_fit} forwards in the fit, "
          f"{sum(seen[:n_fit])} under autocast; exported and predicted on the CPU -> {'ok' if ok else 'FAILED'}")
    if not ok: failed.append(name)
print(f"cuda smoke: {len(RULES) - len(failed)} ok, {len(failed)} failed" + (f": {failed}" if failed else ''))
raise SystemExit(1 if failed else 0)
EOF
}

FAILED=0
SUMMARY="$OUT/summary.txt"
# pytest's last line (-q), the smoke's verdict
SUMMARY_LINE='^[0-9]+(/[0-9]+)? tests? collected|^[0-9]+ (passed|failed|errors?|skipped)|no tests ran|Interrupted|^cuda smoke:'
: > "$SUMMARY"
record() { # record NAME RC FILE: one summary line per step, with pytest's last line where there is one
    local last=""
    [[ -f "$3" ]] && last="$(grep -E "$SUMMARY_LINE" "$3" | tail -n 1 || true)"
    echo "$1: exit $2${last:+ | $last}" | tee -a "$SUMMARY"
    if [[ "$2" != 0 ]]; then FAILED=1; fi
}
step() { # step NAME FILE LIMIT_S CMD...: run CMD with a time limit, output to FILE and to the terminal
    local name="$1" file="$2" limit="$3" rc=0; shift 3
    echo "== $name: $*" | tee "$file"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$file" || rc=$?
    if [[ "$rc" == 124 || "$rc" == 137 ]]; then echo "$name: ran past its ${limit} s limit" | tee -a "$file"; fi
    record "$name" "$rc" "$file"
}

N_GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"

if [[ "$DRY_RUN" == 1 ]]; then
    echo "dry run in $REPO, output to $OUT; GPUs torch sees: $N_GPUS"
    for c in "$PY" timeout tee grep; do
        command -v "$c" > /dev/null && echo "found $c: $(command -v "$c")" || { echo "missing: $c"; FAILED=1; }
    done
    command -v nvidia-smi > /dev/null && echo "found nvidia-smi" || echo "nvidia-smi not here (needed only on the GPU)"
    write_smoke
    step "smoke script compiles" "$OUT/dry_smoke.txt" 60 "$PY" -m py_compile "$OUT/cuda_smoke.py"
    step "collect keyword tests" "$OUT/dry_keyword.txt" 120 "$PY" -m pytest --collect-only -q "${KEYWORD_SEL[@]}"
    step "collect device tests" "$OUT/dry_device.txt" 120 "$PY" -m pytest --collect-only -q "${DEVICE_SEL[@]}"
    step "collect ddp tests" "$OUT/dry_ddp.txt" 120 "$PY" -m pytest --collect-only -q "${DDP_SEL[@]}"
    step "step_cost --help" "$OUT/dry_step_cost.txt" 60 "$PY" benchmarks/step_cost.py --help
    grep -q -- '--device' "$OUT/dry_step_cost.txt" || { echo "step_cost.py has no --device option"; FAILED=1; }
    # a selection that collects nothing would pass on the GPU without testing anything
    for f in dry_keyword dry_device dry_ddp; do
        grep -qE '^[0-9]+(/[0-9]+)? tests? (collected|selected)' "$OUT/$f.txt" || { echo "$f: no tests collected"; FAILED=1; }
    done
    if [[ "$N_GPUS" == 0 ]]; then echo "dry run: no GPU present; every command exists and every selection collects"; fi
    [[ "$FAILED" == 0 ]] && echo "dry run OK" || echo "dry run FAILED"
    exit "$FAILED"
fi

if [[ "$N_GPUS" == 0 ]]; then echo "no GPU present (torch.cuda.is_available() is False): nothing run; see --dry-run" >&2; exit 2; fi

start=$SECONDS
# (a) the machine
{
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" -c 'import torch, fastai; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, fastai {fastai.__version__}"); [print(f"GPU {i}: {torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB") for i in range(torch.cuda.device_count())]'
} 2>&1 | tee "$OUT/env.txt"

# (b) tests
step "pytest keyword" "$OUT/pytest_keyword.txt" "${TESTS_S:-90}" "$PY" -m pytest -q -rfE "${KEYWORD_SEL[@]}"
step "pytest device" "$OUT/pytest_device.txt" "${DEVICE_TESTS_S:-100}" "$PY" -m pytest -q -rfE "${DEVICE_SEL[@]}"
write_smoke
step "cuda smoke" "$OUT/cuda_smoke.txt" "${SMOKE_S:-60}" "$PY" "$OUT/cuda_smoke.py"
if [[ "$N_GPUS" -gt 1 ]]; then
    step "pytest ddp" "$OUT/pytest_ddp.txt" "${DDP_S:-120}" "$PY" -m pytest -q -rfE "${DDP_SEL[@]}"
else
    echo "pytest ddp: skipped, $N_GPUS GPU (needs more than 1)" | tee -a "$SUMMARY"
fi

# (c) step cost on the GPU
step "step_cost" "$OUT/step_cost.md" "${STEP_COST_S:-180}" "$PY" benchmarks/step_cost.py --device cuda \
    --json "$OUT/step_cost.json" "${STEP_COST_ARGS[@]}"

# (d) the summary
echo "total: $((SECONDS - start)) s on $N_GPUS GPU(s); $([[ "$FAILED" == 0 ]] && echo 'all steps passed' || echo 'SOME STEPS FAILED')" \
    | tee -a "$SUMMARY"
exit "$FAILED"
