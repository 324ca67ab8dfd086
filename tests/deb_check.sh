#!/bin/bash
# The Debian package (`make deb`), checked as far as this machine allows (`make deb-check`, part
# of `make test`): its files, modes, conffiles and maintainer scripts with dpkg-deb; then, as
# root and when no gatehouse package is installed already, installed on this machine with
# dpkg (twice: an upgrade), the user, directories and enabled unit checked, the unit verified by
# systemd-analyze (when present), `gatehouse check-config` run as the gatehouse user against the
# installed configuration, and the package purged again. Without root the install is skipped
# with a printed reason.
set -euo pipefail

deb="${1:?usage: deb_check.sh PACKAGE.deb}"
fail() { echo "deb-check: FAIL: $*" >&2; exit 1; }
ok() { echo "deb-check: ok: $*"; }

contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
has() { grep -qE "$2" <<<"$contents" || fail "$1 missing from the package"; ok "$1"; }

has "binary /usr/bin/gatehouse (0755)" '^-rwxr-xr-x .* \./usr/bin/gatehouse$'
has "unit gatehouse.service" '\./(usr/)?lib/systemd/system/gatehouse\.service$'
has "config /etc/gatehouse/gatehouse.toml" '\./etc/gatehouse/gatehouse\.toml$'
has "docs install.md and operations.md" '\./usr/share/doc/gatehouse/install\.md$'
has "stock profiles to copy from" '\./usr/share/doc/gatehouse/devices/xy-md02\.toml$'

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -e "$deb" "$tmp/control"
grep -qx '/etc/gatehouse/gatehouse.toml' "$tmp/control/conffiles" ||
    fail "gatehouse.toml is not a conffile: $(cat "$tmp/control/conffiles" 2>/dev/null)"
ok "conffile /etc/gatehouse/gatehouse.toml"
for s in postinst postrm prerm; do
    [ -x "$tmp/control/$s" ] || fail "no executable $s"
    sh -n "$tmp/control/$s" || fail "$s is not valid sh"
done
grep -q 'useradd --system' "$tmp/control/postinst" || fail "postinst creates no system user"
grep -q 'install -d -m 0700 -o gatehouse -g gatehouse /var/lib/gatehouse' "$tmp/control/postinst" ||
    fail "postinst does not create /var/lib/gatehouse 0700"
grep -q 'deb-systemd-helper.* enable' "$tmp/control/postinst" || fail "postinst does not enable the unit"
grep -q 'try-restart gatehouse.service' "$tmp/control/postinst" || fail "postinst does not restart the unit on upgrade"
grep -q 'rm -rf /var/lib/gatehouse' "$tmp/control/postrm" || fail "postrm does not remove the data on purge"
ok "maintainer scripts (user, data dir, enable, restart on upgrade, purge)"
grep -q '^ Depends:.*passwd' <<<"$info" || fail "Depends lacks passwd (useradd): $info"
ok "control: $(grep '^ Depends:' <<<"$info" | sed 's/^ //')"

if [ "$(id -u)" != 0 ]; then
    echo "deb-check: skipped installing the package: not root (run make test as root to install it with dpkg -i)"
    exit 0
fi
if dpkg-query -W -f='${Status}' gatehouse 2>/dev/null | grep -q 'installed'; then
    echo "deb-check: skipped installing the package: a gatehouse package is installed on this machine already"
    exit 0
fi
if [ -e /etc/gatehouse ] || [ -e /var/lib/gatehouse ]; then
    echo "deb-check: skipped installing the package: /etc/gatehouse or /var/lib/gatehouse exists"
    exit 0
fi
purge() { dpkg --purge gatehouse >/dev/null 2>&1 || true; }
trap 'purge; rm -rf "$tmp"' EXIT

dpkg -i "$deb" >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; fail "dpkg -i"; }
ok "dpkg -i"
# Again: an upgrade over itself (the maintainer scripts are idempotent).
dpkg -i "$deb" >"$tmp/upgrade.log" 2>&1 || { cat "$tmp/upgrade.log"; fail "dpkg -i over the installed package"; }
ok "dpkg -i over the installed package (upgrade path)"

getent passwd gatehouse >/dev/null || fail "no user gatehouse"
[ "$(getent passwd gatehouse | cut -d: -f7)" = /usr/sbin/nologin ] || fail "gatehouse can log in"
getent group gatehouse >/dev/null || fail "no group gatehouse"
if getent group dialout >/dev/null; then
    id -nG gatehouse | grep -qw dialout || fail "gatehouse is not in dialout"
fi
ok "system user and group gatehouse ($(id gatehouse))"
[ "$(stat -c '%a %U %G' /var/lib/gatehouse)" = "700 gatehouse gatehouse" ] ||
    fail "/var/lib/gatehouse is $(stat -c '%a %U %G' /var/lib/gatehouse)"
ok "/var/lib/gatehouse 0700 gatehouse"
[ -d /etc/gatehouse/devices ] || fail "no /etc/gatehouse/devices"
ok "/etc/gatehouse/devices"
unit=$(ls /lib/systemd/system/gatehouse.service /usr/lib/systemd/system/gatehouse.service 2>/dev/null | head -1)
[ -n "$unit" ] || fail "unit not installed"
[ -L /etc/systemd/system/multi-user.target.wants/gatehouse.service ] || fail "unit not enabled"
ok "unit enabled ($unit)"
if command -v systemd-analyze >/dev/null; then
    # verify wants the binaries the unit names; it checks the directives too.
    systemd-analyze verify "$unit" 2>&1 | grep -v 'bluetooth.service' | tee "$tmp/verify.log" || true
    ! grep -qiE 'unknown|invalid|failed' "$tmp/verify.log" || fail "systemd-analyze verify: $(cat "$tmp/verify.log")"
    ok "systemd-analyze verify"
    systemd-analyze security --offline=true "$unit" 2>/dev/null | tail -1
fi
out=$(runuser -u gatehouse -- /usr/bin/gatehouse check-config --config /etc/gatehouse/gatehouse.toml 2>&1) ||
    fail "check-config of the installed config as gatehouse: $out"
grep -q ': ok' <<<"$out" || fail "check-config said: $out"
ok "installed check-config as gatehouse: $out"

dpkg --purge gatehouse >"$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log"; fail "dpkg --purge"; }
[ ! -e /usr/bin/gatehouse ] || fail "/usr/bin/gatehouse left after purge"
[ ! -e /var/lib/gatehouse ] || fail "/var/lib/gatehouse left after purge"
[ ! -e /etc/gatehouse ] || fail "/etc/gatehouse left after purge"
[ ! -e /etc/systemd/system/multi-user.target.wants/gatehouse.service ] || fail "unit still enabled after purge"
ok "dpkg --purge removes the binary, the config, the data and the enablement"
echo "deb-check: all checks passed"
