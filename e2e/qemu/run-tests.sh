#!/usr/bin/env bash
# Runs Rust test executables inside a QEMU guest booted on Debian's stock kernel (see README.md).
#
#   run-tests.sh [options] <test-binary> [test args...]
#   run-tests.sh [options] --bin <test-binary> [--bin <another>...] [--] [test args...]
#
# Test args (filters such as `ipip`, `--exact`, ...) go to every binary; the runner adds
# `--test-threads=1 --nocapture` so a test's stderr (its `SKIP:` lines) reaches the console.
#
# Options:
#   --with-bird        also ship BIRD 2 (bird, birdc, birdcl) into the guest
#   --module NAME      also load kernel module NAME (with its dependencies); repeatable
#   --timeout SECS     kill the guest after SECS (default $TORTIE_QEMU_TIMEOUT or 300)
#   --allow-empty      do not fail when no test ran
#
# Exit status: the guest's (the first failing binary's status), 124 on timeout, 3 when a test
# reported `SKIP:`, 4 when no test ran, 2 on usage/setup errors, 1 when the guest died unseen.
#
# Environment: TORTIE_CACHE (default ~/.cache/tortie), TORTIE_QEMU_KEEP=1 keeps the work dir
# (initramfs tree, initrd, console log), TORTIE_QEMU_SHELL=1 gives an interactive shell in the
# guest after the tests (no timeout; leave it with `exit` or Ctrl-A X), TORTIE_QEMU_COMPRESS=
# gzip|none picks the initrd's compression (none: as fast, simpler), TORTIE_QEMU_STRIP=0 keeps
# the test executables' debug info (4x larger initrd, ~5 s slower boot).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${TORTIE_CACHE:-$HOME/.cache/tortie}/qemu"
kernel_dir="$cache/kernel"

die() {
  echo "qemu-run: $*" >&2
  exit 2
}

binaries=()
test_args=()
with_bird=0
allow_empty=0
timeout_secs="${TORTIE_QEMU_TIMEOUT:-300}"
# ipip brings tunnel4 + ip_tunnel; vxlan brings udp_tunnel + ip6_udp_tunnel; bridge brings stp + llc.
modules=(ipip vxlan veth bridge dummy)

while (($#)); do
  case "$1" in
    --with-bird) with_bird=1 ;;
    --allow-empty) allow_empty=1 ;;
    --module) modules+=("${2:?--module needs a name}"); shift ;;
    --timeout) timeout_secs="${2:?--timeout needs seconds}"; shift ;;
    --bin) binaries+=("${2:?--bin needs a path}"); shift ;;
    --) shift; test_args+=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *)
      if ((${#binaries[@]} == 0)); then
        binaries+=("$1")
      else
        test_args+=("$1")
      fi
      ;;
  esac
  shift
done
((${#binaries[@]})) || die "no test binary given (see --help)"
[[ "$timeout_secs" =~ ^[0-9]+$ ]] || die "--timeout wants whole seconds, got '$timeout_secs'"
for tool in qemu-system-x86_64 busybox cpio ldd modprobe; do
  command -v "$tool" >/dev/null || die "$tool missing (run make deps)"
done
[[ -f "$kernel_dir/.ready" ]] || "$here/prepare.sh"
kver="$(cat "$kernel_dir/kver")"

now() { date +%s.%N; }
# Seconds between two `now` readings, one decimal.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
started=$(now)
mkdir -p "$cache"
work="$(mktemp -d "$cache/run.XXXXXX")"
root="$work/root"
cleanup() {
  if [[ "${TORTIE_QEMU_KEEP:-0}" == 1 ]]; then
    echo "qemu-run: kept $work (root/ is the initramfs tree, console.log the serial output)" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib64,proc,sys,dev,tmp,run,var,etc/tortie,root,tests}
ln -s ../run "$root/var/run"

# Copies an ELF file to the same path inside the guest, with every library the loader needs.
declare -A shipped=()
ship_elf() {
  local file="$1" dest="${2:-$1}" lib
  [[ -n "${shipped[$dest]:-}" ]] && return 0
  shipped[$dest]=1
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$file" "$root$dest"
  # ldd prints `name => /path (addr)` for libraries and `/path (addr)` for the loader.
  while read -r lib; do
    [[ -n "${shipped[$lib]:-}" ]] && continue
    shipped[$lib]=1
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$file" 2>/dev/null | grep -oE '(=> )?/[^ ]+ \(0x' | sed -E 's/^=> //; s/ \(0x$//')
}

# Busybox provides the shell and the small tools; Debian's own binaries come first in PATH
# (/usr/sbin, /usr/bin) because busybox's ip has no netns and cannot add links.
cp /bin/busybox "$root/bin/busybox"
for applet in $(busybox --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
host_path() {
  local p
  p="$(command -v "$1")" || die "$1 not found on the host (run make deps)"
  readlink -f "$p"
}
ship_elf "$(host_path ip)" /usr/sbin/ip
ship_elf "$(host_path bridge)" /usr/sbin/bridge
ship_elf "$(host_path sysctl)" /usr/sbin/sysctl
ship_elf "$(host_path ping)" /usr/bin/ping
if ((with_bird)); then
  for b in bird birdc birdcl; do
    ship_elf "$(host_path "$b")" "/usr/sbin/$b"
  done
fi
for d in /etc/iproute2 /usr/share/iproute2 /usr/lib/iproute2; do
  [[ -d "$d" ]] && mkdir -p "$root$(dirname "$d")" && cp -a "$d" "$root$d"
done
for f in /etc/protocols /etc/services; do
  [[ -f "$f" ]] && cp "$f" "$root$f"
done
printf 'root:x:0:0:root:/root:/bin/sh\nbird:x:101:101:bird:/run/bird:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nbird:x:101:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
echo tortie-guest >"$root/etc/hostname"
# Busybox's shell runs its own applets before searching PATH; functions win over applets, so the
# debug shell gets Debian's tools under their plain names.
{
  echo "export PATH=/usr/sbin:/usr/bin:/sbin:/bin"
  for tool in /usr/sbin/ip /usr/sbin/bridge /usr/sbin/sysctl /usr/bin/ping; do
    echo "$(basename "$tool")() { $tool \"\$@\"; }"
  done
} >"$root/etc/profile"

# Modules in dependency order, resolved with the unpacked tree's modules.dep (the host's
# /etc/modprobe.d must not leak in, hence the empty config dir).
mkdir -p "$work/no-modprobe.d"
modlist="$root/etc/tortie/modules"
: >"$modlist"
declare -A mod_seen=()
for m in "${modules[@]}"; do
  deps="$(modprobe -d "$kernel_dir" -S "$kver" -C "$work/no-modprobe.d" --show-depends "$m" 2>&1)" \
    || die "module $m: $deps"
  while read -r kind path params; do
    case "$kind" in
      insmod)
        [[ -n "${mod_seen[$path]:-}" ]] && continue
        mod_seen[$path]=1
        rel="${path#"$kernel_dir"}"
        mkdir -p "$root$(dirname "$rel")"
        cp "$path" "$root$rel"
        echo "$rel $params" >>"$modlist"
        ;;
      builtin) ;;
      *) die "module $m: unexpected modprobe output: $kind $path $params" ;;
    esac
  done <<<"$deps"
done
for f in modules.dep modules.alias modules.builtin modules.order; do
  [[ -f "$kernel_dir/lib/modules/$kver/$f" ]] && cp "$kernel_dir/lib/modules/$kver/$f" "$root/lib/modules/$kver/"
done

# The tests, each with its libraries, and the script that runs them.
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
run_script="$root/etc/tortie/run"
echo "# Sourced by /init: runs each test executable, keeps the first failure in \$status." >"$run_script"
marker="TORTIE-QEMU-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
for b in "${binaries[@]}"; do
  [[ -x "$b" ]] || die "test binary $b is not an executable file"
  name="$(basename "$b")"
  ship_elf "$b" "/tests/$name"
  # Debug info is most of a test executable's size; symbols stay, so backtraces keep names.
  if [[ "${TORTIE_QEMU_STRIP:-1}" == 1 ]] && command -v objcopy >/dev/null; then
    objcopy --strip-debug "$root/tests/$name"
  fi
  {
    printf 'echo "$marker-BEGIN %s"\n' "$name"
    printf '/tests/%s --test-threads=1 --nocapture' "$name"
    for a in "${test_args[@]}"; do printf ' %s' "$(quote "$a")"; done
    printf ' </dev/null 2>&1\n'
    printf 'rc=$?; echo "$marker-END %s status=$rc"\n' "$name"
    printf '[ "$status" -eq 0 ] && status=$rc\n'
  } >>"$run_script"
done

shell=0
[[ "${TORTIE_QEMU_SHELL:-0}" == 1 ]] && shell=1
echo "$marker" >"$root/etc/tortie/marker"
echo "$shell" >"$root/etc/tortie/shell"
cp "$here/init" "$root/init"
chmod +x "$root/init"

initrd="$work/initrd"
compress="${TORTIE_QEMU_COMPRESS:-none}"
case "$compress" in
  gzip) (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$initrd" ;;
  none) (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) >"$initrd" ;;
  *) die "TORTIE_QEMU_COMPRESS must be gzip or none, got '$compress'" ;;
esac
built=$(now)
echo "qemu-run: initramfs $(du -h "$initrd" | cut -f1) ($compress) built in $(elapsed "$started" "$built") s; booting $kver" >&2

# TCG, not KVM: the host offers only a paravirtual KVM that stock kernels cannot use.
qemu=(qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 2 -nographic -no-reboot -nic none
  -kernel "$kernel_dir/vmlinuz" -initrd "$initrd"
  -append "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic rdinit=/init")
log="$work/console.log"
set +e
if ((shell)); then
  "${qemu[@]}" | tee "$log"
  qemu_status=${PIPESTATUS[0]}
else
  timeout -k 5 "$timeout_secs" "${qemu[@]}" </dev/null | sed -u 's/\r$//' | tee "$log"
  qemu_status=${PIPESTATUS[0]}
fi
set -e
finished=$(now)
cp "$log" "$cache/last-console.log"
wall="$(elapsed "$started" "$finished")"
guest="$(elapsed "$built" "$finished")"
echo "qemu-run: wall ${wall} s (guest boot + tests ${guest} s); console log: $cache/last-console.log" >&2

log_text="$(tr -d '\r' <"$log")"
if ((qemu_status == 124 || qemu_status == 137)); then
  echo "qemu-run: FAIL: guest killed after ${timeout_secs} s timeout" >&2
  exit 124
fi
exit_line="$(grep -oE "$marker-EXIT status=[0-9]+" <<<"$log_text" | tail -n1 || true)"
ready_uptime="$(grep -oE "$marker-GUEST-READY .* uptime=[0-9.]+" <<<"$log_text" | sed 's/.*uptime=//' || true)"
exit_uptime="$(grep -oE "$marker-EXIT status=[0-9]+ uptime=[0-9.]+" <<<"$log_text" | sed 's/.*uptime=//' || true)"
[[ -n "$ready_uptime" && -n "$exit_uptime" ]] \
  && echo "qemu-run: guest kernel clock: ready after ${ready_uptime} s, tests took $(elapsed "$ready_uptime" "$exit_uptime") s" >&2
if [[ -z "$exit_line" ]]; then
  echo "qemu-run: FAIL: the guest stopped without reporting (qemu status $qemu_status); see the console log" >&2
  exit 1
fi
guest_status="${exit_line##*=}"
if grep -q "$marker-MODULE-FAILED" <<<"$log_text"; then
  echo "qemu-run: FAIL: a kernel module did not load: $(grep "$marker-MODULE-FAILED" <<<"$log_text" | sed "s/$marker-MODULE-FAILED //" | xargs)" >&2
  exit "$guest_status"
fi
# Any word SKIP counts (`SKIP: no ipip module`, the apiserver's `==== SKIP name ====`).
skips="$(grep -E '(^|[^[:alnum:]_])SKIP([^[:alnum:]_]|$)' <<<"$log_text" || true)"
if [[ -n "$skips" ]]; then
  echo "qemu-run: FAIL: tests that should run in the guest reported a skip:" >&2
  echo "$skips" >&2
  exit 3
fi
if ((guest_status != 0)); then
  echo "qemu-run: FAIL: tests failed in the guest (status $guest_status)" >&2
  exit "$guest_status"
fi
passed="$(grep -oE '^test result: ok\. [0-9]+ passed' <<<"$log_text" | awk '{s += $4} END {print s + 0}')"
if ((passed == 0 && !allow_empty)); then
  echo "qemu-run: FAIL: no test ran (filters: ${test_args[*]:-none})" >&2
  exit 4
fi
echo "qemu-run: PASS: $passed test(s) passed in the guest ($kver)" >&2
