# Shared by the one-command wrappers next to this file (experiment, failover); sourced, not run.
# Sets here, repo, venv and python; `ensure_venv` makes the virtualenv (examples/celery/.venv, or
# $WARREN_EXPERIMENT_VENV) with requirements.txt (Celery and what it pulls in) when it is missing
# or out of date; `build_release PKG...` builds those packages in release mode into target/release.
# Messages start with "$prog: " (set prog before sourcing).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${WARREN_EXPERIMENT_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

say() { printf '%s: %s\n' "$prog" "$*" >&2; }

ensure_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    command -v "$python" >/dev/null || { say "$python not found: install Python 3.9 or later"; exit 1; }
    say "creating the virtualenv $venv"
    if ! "$python" -m venv "$venv"; then
      rm -rf "$venv"
      say "cannot create a virtualenv: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
      exit 1
    fi
  fi
  if ! cmp -s "$here/requirements.txt" "$venv/.requirements.installed" 2>/dev/null; then
    say "installing Celery into $venv (requirements.txt)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/.requirements.installed"
  fi
}

build_release() {
  local pkgs=() p
  for p in "$@"; do pkgs+=(-p "$p"); done
  command -v cargo >/dev/null || { say "cargo not found: install Rust (https://rustup.rs) or pass --bin-dir"; exit 1; }
  say "cargo build --release ${pkgs[*]}"
  (cd "$repo" && cargo build --release --quiet "${pkgs[@]}")
}
