#!/usr/bin/env bash
# Creates (once) the project's Python environment and prints its folder.
#
# The environment lives in ~/.cache/kubetune/venv/<key>, where <key> hashes
# uv.lock (which records pyproject's requirements): it is reused while the lock
# is unchanged and
# shared by every checkout. The project itself is not installed into it
# (checkouts put their own source on PYTHONPATH), so two clones never fight
# over one editable install.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
python=${KUBETUNE_PYTHON:-python3.11}
command -v "$python" >/dev/null || { echo "error: $python is needed (kubetune runs on Python 3.11)" >&2; exit 1; }

uv_home="$cache/uv-tool/$UV_VERSION"
if [ ! -x "$uv_home/bin/uv" ]; then
  echo "[python-env] installing uv $UV_VERSION" >&2
  rm -rf "$uv_home"
  "$python" -m venv "$uv_home"
  "$uv_home/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

# The key also names how it is built: bytecode is compiled at install time, so imports
# stay fast where PYTHONDONTWRITEBYTECODE keeps Python from caching it.
key=$( (cat "$root/uv.lock"; echo "compile-bytecode") | sha256sum | cut -c1-16)
venv="$cache/venv/$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[python-env] creating $venv (first time: downloads torch and friends)" >&2
  export UV_CACHE_DIR="$cache/uv-cache" UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT="$venv"
  (cd "$root" && "$uv_home/bin/uv" sync --locked --all-extras --no-install-project --compile-bytecode --python "$python" --quiet)
  touch "$venv/.complete"
  # Keep the three most recent environments (several GB each).
  ls -1dt "$cache"/venv/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
fi
echo "$venv"
