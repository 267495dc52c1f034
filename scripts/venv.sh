# Sourced by setup_vllm.sh and setup_bench.sh: `make_venv DIR NAME` creates DIR (if missing) and
# activates it, sends pip's notices to DIR/setup.log, and defines `install ARGS` (pip install
# that prints the log and exits on failure).
make_venv() {
  venv_dir=$1 venv_name=$2
  if [ ! -x "$venv_dir/bin/python" ]; then
    python3 -m venv "$venv_dir"
  fi
  # shellcheck disable=SC1091
  . "$venv_dir/bin/activate"
  log=$venv_dir/setup.log
  : > "$log"
}

install() {
  if ! python -m pip install --quiet "$@" >> "$log" 2>&1; then
    echo "$venv_name: pip install $* failed; its output:" >&2
    cat "$log" >&2
    exit 1
  fi
}
