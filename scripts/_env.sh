# Shared set-up for scripts/test.sh and scripts/demo.sh: system packages and virtual environments.
# Sourced, not executed. Idempotent: a second run only checks.

ensure_apt() {  # ensure_apt PKG...: install the Debian packages that are missing (sudo when not root)
  local need=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "== installing ${need[*]} with apt-get"
  local sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
}

# Everything the demo needs; scripts/test.sh adds what the tests need on top.
ensure_apt mosquitto
# mosquitto's Debian package starts a system broker on 1883; the tests and the demo start their own.

make_venv() {  # make_venv DIR PYTHON
  local dir=$1 py=$2
  if [ ! -x "$dir/bin/python" ]; then
    echo "== creating $dir with $("$py" --version 2>&1)"
    "$py" -m venv "$dir"
  fi
  local stamp="$dir/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== installing the project and its cpu,dev extras into $dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q -e '.[cpu,dev]'
    touch "$stamp"
  fi
}

find_python38() {
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.8(\.|$)' | sort -V | tail -n 1)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python"; return; fi
  fi
  command -v python3.8 || true
}
