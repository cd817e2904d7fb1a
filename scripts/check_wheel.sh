#!/usr/bin/env bash
# Build the wheel, install it with its dependencies into a brand-new venv, and check what a user gets: every
# source file is packaged, `depn ... --help` works at every depth of the command tree, and the vLLM plugin entry
# point resolves. Prints one line per check and a summary; exits non-zero if any check failed. A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

build_python=python3
if [ -x .venv/bin/python ]; then build_python=.venv/bin/python; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH  # nothing but the installed wheel may be importable in the clean venv

passed=0
failed=0
check() {  # check DESCRIPTION COMMAND...: run COMMAND, print one line, and show its last output lines if it fails
  local description=$1 out
  shift
  if out=$("$@" 2>&1 </dev/null); then
    echo "ok    $description"
    passed=$((passed + 1))
  else
    echo "FAIL  $description"
    tail -n 8 <<<"$out" | sed 's/^/        /'
    failed=$((failed + 1))
  fi
}
summary() {
  echo "wheel check: $passed passed, $failed failed"
  exit $((failed > 0))
}

# Build from a copy of the files git tracks (and untracked ones it does not ignore): a build/ or *.egg-info left in
# the working tree by an earlier build would otherwise leak stale modules into the wheel.
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
check "wheel builds" "$build_python" -m pip wheel --quiet --no-deps -w "$tmp/dist" "$tmp/src"
[ "$failed" -eq 0 ] || summary
wheel=$(echo "$tmp"/dist/*.whl)

# Every .py file of the source tree is in the wheel, and no other.
(cd "$tmp/src" && { find depn_serve -name '*.py'; find patches -name '*.py' | sed 's|^patches/|depn_serve_patches/|'; }) |
  sort >"$tmp/source.txt"
"$build_python" -c 'import sys, zipfile; print(*zipfile.ZipFile(sys.argv[1]).namelist(), sep="\n")' "$wheel" |
  { grep -E '^depn_serve(_patches)?/.*\.py$' || true; } | sort >"$tmp/wheel.txt"
files_match() {
  local missing extra
  missing=$(comm -23 "$tmp/source.txt" "$tmp/wheel.txt")
  extra=$(comm -13 "$tmp/source.txt" "$tmp/wheel.txt")
  [ -z "$missing" ] || echo "missing from the wheel:" $missing
  [ -z "$extra" ] || echo "in the wheel but not in the source tree:" $extra
  [ -z "$missing$extra" ]
}
check "wheel holds all $(wc -l <"$tmp/source.txt") source .py files" files_match

python3 -m venv "$tmp/venv"
py=$tmp/venv/bin/python
depn=$tmp/venv/bin/depn
failed_before=$failed
check "wheel installs with its dependencies into a fresh venv" "$py" -m pip install --quiet "$wheel"
[ "$failed" -eq "$failed_before" ] || summary
cd "$tmp"  # so that Python cannot pick up the source tree from the working directory

check "depn --help" timeout 120 "$depn" --help
walk='
import click
from depn_serve.cli import main

def walk(command: click.Command, path: list[str]) -> None:
    if path:
        print(" ".join(path))
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            walk(sub, [*path, name])

walk(main, [])
'
if paths=$(timeout 120 "$py" -c "$walk" 2>"$tmp/walk.err"); then  # stderr apart: a warning is no command
  echo "ok    command tree lists $(wc -l <<<"$paths") subcommands"
  passed=$((passed + 1))
  while read -r -a path; do
    check "depn ${path[*]} --help" timeout 120 "$depn" "${path[@]}" --help
  done <<<"$paths"
else
  echo "FAIL  command tree lists the subcommands"
  tail -n 8 "$tmp/walk.err" | sed 's/^/        /'
  failed=$((failed + 1))
fi

check "import depn_serve_patches" "$py" -c 'import depn_serve_patches'
entry_point='
from importlib.metadata import entry_points

found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
assert found.get("depn") == "depn_serve_patches:register", f"vllm.general_plugins: {found}"
'
check "entry point vllm.general_plugins: depn = depn_serve_patches:register" "$py" -c "$entry_point"
summary
