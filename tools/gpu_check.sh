#!/usr/bin/env bash
# A short CUDA check of the distributed path, for a GPU machine with only this repository
# and a Python that has torch with CUDA. Needs no network; runs in well under 3 minutes.
#
#   bash tools/gpu_check.sh [PYTHON]        (default: python3; results under $GPU_CHECK_OUT, default $TMPDIR/bnexport-gpu-check)
#
# 1. torchrun --nproc_per_node=1 ... train-and-export --device cuda --sync-bn: NCCL, BN layers
#    trained as SyncBatchNorm and exported as BatchNorm2d, parity (with ORT's CUDA provider
#    when onnxruntime-gpu is installed); 2 processes as well when the machine has 2 GPUs.
# 2. the same with --device auto (CUDA must be picked) and without --sync-bn (the merge path).
# 3. --device cpu on the same machine, which must not touch CUDA.
# Without onnx/onnxruntime/onnxscript, the export steps cannot run; the script then trains
# under torchrun through the library alone and checks the CUDA model against its CPU copy.
set -u
PY=${1:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${GPU_CHECK_OUT:-${TMPDIR:-/tmp}/bnexport-gpu-check}
rm -rf "$OUT" && mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO"
status=0
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
run() {  # name, nproc, then bnexport arguments
  local name=$1 nproc=$2; shift 2
  echo "== $name: torchrun --nproc_per_node=$nproc -m bnexport $*"
  local started=$SECONDS
  timeout 150 "$PY" -m torch.distributed.run --nproc_per_node="$nproc" --nnodes=1 --master_addr=127.0.0.1 \
    --master_port="$(port)" -m bnexport "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1
  local code=$?
  echo "   exit $code after $((SECONDS - started))s (log: $OUT/$name.log)"
  tail -n 25 "$OUT/$name.log" | grep -v '^W[0-9]' | sed 's/^/   | /'
  [ "$code" -eq 0 ] || status=1
}

echo "== environment"
"$PY" - <<'EOF' || exit 2
import importlib.util, torch
print(f"   torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} GPU(s){': ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
print(f"   NCCL available: {torch.distributed.is_nccl_available()}")
missing = [m for m in ("onnx", "onnxruntime", "onnxscript", "tqdm", "numpy") if importlib.util.find_spec(m) is None]
print(f"   missing modules: {', '.join(missing) or 'none'}")
if importlib.util.find_spec("onnxruntime"):
    import onnxruntime
    print(f"   onnxruntime {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA here: nothing to check")
EOF
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
FULL=$("$PY" -c 'import importlib.util as u; print(all(u.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript", "tqdm")))')
COMMON=(--dataset synthetic --synthetic-shape 3,32,32 --epochs 2 --max-steps 20 --quiet)

if [ "$FULL" = "True" ]; then
  run cuda-syncbn 1 train-and-export "${COMMON[@]}" --device cuda --sync-bn
  [ "$GPUS" -ge 2 ] && run cuda-syncbn-2gpu 2 train-and-export "${COMMON[@]}" --device cuda --sync-bn
  run auto-merge 1 train-and-export "${COMMON[@]}" --device auto
  run cpu 1 train "${COMMON[@]}" --device cpu
  echo "== evidence from summary.json and parity.json"
  "$PY" - "$OUT" "$GPUS" <<'EOF' || status=1
import json, sys
from pathlib import Path
out, ok = Path(sys.argv[1]), True
expected = ["cuda-syncbn", *(["cuda-syncbn-2gpu"] if int(sys.argv[2]) >= 2 else []), "auto-merge", "cpu"]
for name in expected:
    path = out / name / "summary.json"
    if not path.exists():
        print(f"   {name}: no summary.json (see its log)")
        ok = False
        continue
    summary = json.loads(path.read_text())
    r = summary.get("replicas", {})
    print(f"   {name}: backend {r.get('backend')}, device {r.get('device')}, world {r.get('world_size')}, "
          f"SyncBN {r.get('sync_bn')} {r.get('sync_bn_layers')}, BN stats {r.get('bn_statistics')}, "
          f"ranks identical {len(set(r.get('bn_fingerprints', []))) == 1}, parity {summary.get('parity')}, "
          f"ONNX BatchNormalization nodes {summary.get('onnx_ops', {}).get('model.onnx', {}).get('BatchNormalization')}")
    parity = out / name / "parity.json"
    if parity.exists():
        for row in json.loads(parity.read_text())["results"]:
            print(f"      {row['name']:<38} max|d| {row['max_abs']:.2e}  {'ok' if row['passed'] else 'FAIL'}")
    expect_cuda = name != "cpu"
    ok &= (r.get("backend") == ("nccl" if expect_cuda else "gloo")) and (summary.get("parity") in ("pass", None))
    if name.startswith("cuda-syncbn"):
        ok &= r.get("sync_bn") is True and all(v == "BatchNorm2d -> SyncBatchNorm -> BatchNorm2d"
                                                for v in r.get("sync_bn_layers", {}).values())
print("   RESULT:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
else
  echo "== onnx stack missing: training under torchrun through the library, CUDA model against its CPU copy"
  cat >"$OUT/train_only.py" <<'EOF'
import copy, sys, torch
from bnexport.config import TrainConfig
from bnexport.data import make_synthetic
from bnexport.distributed.process_group import process_group
from bnexport.train.loop import new_state, train
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
config = TrainConfig(dataset="synthetic", synthetic_shape=(3, 32, 32), epochs=2, max_steps=20, device="cuda", sync_bn=True)
data = make_synthetic(config.synthetic_shape, size=config.synthetic_size, seed=config.seed)
with process_group(device="cuda", sync_bn=True) as replicas:
    state = train(new_state(config, data), data, progress=False, replicas=replicas)
    if replicas.is_main:
        r = replicas.to_json()
        model = state.model.eval()
        x = data.test_images[:64]
        with torch.no_grad():
            cpu = model(x)
            gpu = copy.deepcopy(model).cuda()(x.cuda()).cpu()
        err = (cpu - gpu).abs().max().item()
        ok = r["backend"] == "nccl" and r["sync_bn"] and err <= 1e-5 + 1e-4 * cpu.abs().max().item()
        print(f"backend {r['backend']}, device {r['device']}, SyncBN layers {r['sync_bn_layers']}, "
              f"fingerprints {r['bn_fingerprints']}, eager CUDA vs CPU max|d| {err:.2e}; RESULT {'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)
EOF
  timeout 150 "$PY" -m torch.distributed.run --nproc_per_node=1 --nnodes=1 --master_addr=127.0.0.1 \
    --master_port="$(port)" "$OUT/train_only.py" 2>&1 | grep -v '^W[0-9]' | tail -n 20 | sed 's/^/   | /'
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== --device cuda errors cleanly where CUDA is hidden"
CUDA_VISIBLE_DEVICES= "$PY" -m bnexport train --device cuda --quiet --out "$OUT/hidden" 2>&1 | sed 's/^/   | /'
echo "== overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
