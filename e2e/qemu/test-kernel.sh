#!/usr/bin/env bash
# `make test-kernel`: builds tortie-e2e's test executables and runs their IPIP tests inside the
# QEMU guest (run-tests.sh), where Debian's stock kernel has the ipip module this host lacks.
#
# Runs every test whose name contains `ipip` or `mode_transitions` in the `dataplane_*` and
# `qemu_guest_*` test executables. TORTIE_KERNEL_TEST_FILTER overrides the filter: libtest
# filters separated by spaces, a test runs when its name contains any of them. Extra runner
# options: TORTIE_QEMU_ARGS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cargo="${CARGO:-cargo}"
# `mode_transitions` is the live switch Never -> IPIP Always -> CrossSubnet -> VXLAN...: its IPIP
# steps skip on the host, so it belongs here although its name lacks `ipip`.
filter="${TORTIE_KERNEL_TEST_FILTER:-ipip mode_transitions}"

"$here/prepare.sh"

# Only the targets the guest runs are built, so an unrelated test file cannot break this. The
# JSON stream (stdout) names each test executable; progress and compiler messages stay on stderr.
executables="$(cd "$repo" && "$cargo" test --no-run -p tortie-e2e --test 'dataplane_*' --test 'qemu_guest_*' \
  --message-format=json-render-diagnostics \
  | jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null) | .executable')"

binaries=()
while read -r exe; do
  [[ -n "$exe" ]] || continue
  case "$(basename "$exe")" in
    dataplane_* | qemu_guest_*) binaries+=(--bin "$exe") ;;
  esac
done <<<"$executables"
if ((${#binaries[@]} == 0)); then
  echo "test-kernel: no dataplane_* or qemu_guest_* test executable was built" >&2
  exit 1
fi

runner_args=(--timeout "${TORTIE_QEMU_TIMEOUT:-600}")
# BGP peers in the IPIP e2e cases are BIRD; ship it whenever the host has it.
command -v bird >/dev/null && runner_args+=(--with-bird)
# shellcheck disable=SC2206 # TORTIE_QEMU_ARGS is a word list on purpose
runner_args+=(${TORTIE_QEMU_ARGS:-})

echo "test-kernel: running tests matching '$filter' from $((${#binaries[@]} / 2)) executable(s) in the guest" >&2
# shellcheck disable=SC2086 # one libtest filter per word
exec "$here/run-tests.sh" "${runner_args[@]}" "${binaries[@]}" -- $filter
