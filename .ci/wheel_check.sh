#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it (alone, no checkout on the path) into a fresh
# virtual environment that sees the already-installed dependencies, and from an empty folder run the demo by
# recipe name for two steps, then sample its export. Run by .ci/run after the tests.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps "$work"/dist/mapo_jax-*.whl
cd "$work"
export JAX_PLATFORMS=cpu
where="$("$work/venv/bin/python" -c 'import mapo_jax, os; print(os.path.dirname(mapo_jax.__file__))')"
case "$where" in "$work/venv/"*) ;; *) echo "the wheel's mapo_jax is not the one imported: $where" >&2; exit 1 ;; esac
"$work/venv/bin/python" -m mapo_jax.train --config demo --workdir "$work/run" --config.steps=2 \
    --config.demo_assets="$work/assets" --config.compile_cache=
"$work/venv/bin/python" -m mapo_jax.generate --model "$work/run" --prompt "a red circle" --out "$work/images" \
    --steps 2 --guidance 3
test -f "$work/images/0000.png" && test -f "$work/run/export/model_index.json"
# The FLUX.1 twin's demo: its base (mapo_jax/toy/flux_base) ships in the wheel too.
"$work/venv/bin/python" -m mapo_jax.train --config demo_flux --workdir "$work/run_flux" --config.steps=2 \
    --config.demo_assets="$work/assets_flux" --config.compile_cache= --config.judge_every=2
"$work/venv/bin/python" -m mapo_jax.generate --model "$work/run_flux" --prompt "a red circle" --out "$work/images_flux" \
    --steps 2 --max-sequence-length 8
test -f "$work/images_flux/0000.png" && test -f "$work/run_flux/export/transformer/config.json"
echo "wheel check: installed $(basename "$work"/dist/mapo_jax-*.whl), trained both demos by recipe name and sampled them"
