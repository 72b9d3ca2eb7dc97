#!/usr/bin/env bash
# Lints, renders and validates charts/relance with the real Helm library (helm-sdkpy, Helm v4
# as a Python package) and the Kubernetes JSON schemas (kubernetes-validate): the default
# values and every values file in charts/relance/ci/. No cluster or helm binary needed; see
# infra/chart_lint.py for what each step does. Exits non-zero on any problem.
#
#   RELANCE_HELM_VENV   the virtualenv (default ${XDG_CACHE_HOME:-$HOME/.cache}/relance/helm-venv)
#   KUBE_VERSIONS       Kubernetes versions to validate against (default "1.27.0 1.37.0")
#   CHART_LINT_SHOW=1   also print the rendered manifests
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${RELANCE_HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/relance/helm-venv}
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.27.0 1.37.0"}
# Exact versions, transitive ones included. helm-sdkpy declares Python >= 3.12 but runs on
# 3.10+; it ships the Helm library for linux/amd64 only.
REQUIREMENTS=(
  helm-sdkpy==0.1.32 cffi==2.1.1 pycparser==3.12
  kubernetes-validate==1.37.0 PyYAML==6.0.4 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0
  importlib_resources==7.1.0 packaging==26.4 typing_extensions==4.16.0
)
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }

if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
  echo "error: helm-sdkpy ships the Helm library for linux/amd64 only (this is $(uname -s)-$(uname -m))" >&2
  exit 1
fi
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "error: $* not installed and no apt-get here; install it with your package manager" >&2
    exit 1
  fi
  say "installing $* with apt"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
case "$VENV" in /|"$HOME"|"") echo "error: RELANCE_HELM_VENV=$VENV is not a place for a virtualenv" >&2; exit 1;; esac
make_venv() { rm -rf "$VENV" && python3 -m venv "$VENV" >/dev/null 2>&1; }

if ! command -v python3 >/dev/null; then apt_install python3 python3-venv; fi
stamp="$VENV/.relance-requirements"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]; then
  say "preparing the virtualenv $VENV"
  mkdir -p "$(dirname "$VENV")"
  # Debian and Ubuntu ship venv's pip bootstrap separately, in python3-venv.
  if ! make_venv; then apt_install python3-venv; make_venv; fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --ignore-requires-python \
    "${REQUIREMENTS[@]}"
  printf '%s' "${REQUIREMENTS[*]}" > "$stamp"
fi

# Helm keeps the release in memory and its caches in a scratch directory.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export HELM_DRIVER=memory HELM_CACHE_HOME="$scratch/cache" HELM_CONFIG_HOME="$scratch/config" \
  HELM_DATA_HOME="$scratch/data"

args=(charts/relance charts/relance/ci/*.yaml)
for version in $KUBE_VERSIONS; do args+=(--kube-version "$version"); done
if [ "${CHART_LINT_SHOW:-}" = 1 ]; then args+=(--show); fi
say "linting, rendering and validating charts/relance"
"$VENV/bin/python" infra/chart_lint.py "${args[@]}"
