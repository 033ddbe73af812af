#!/usr/bin/env bash
# A container health probe that needs nothing but bash (the images carry no curl or wget):
# exits 0 when 127.0.0.1:PORT accepts a connection (no PATH given), or answers `GET PATH` with
# an HTTP 2xx status. Installed in the images as /usr/local/bin/sidbooth-probe.
#
# usage: sidbooth-probe PORT [PATH]     e.g. sidbooth-probe 8080 /readyz
set -euo pipefail
port="${1:?usage: sidbooth-probe PORT [PATH]}"
path="${2:-}"
exec 3<>"/dev/tcp/127.0.0.1/$port"
[ -n "$path" ] || exit 0
printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
status=""
IFS=' ' read -r -t 5 _ status _ <&3 || true
case "$status" in
  2??) exit 0 ;;
  *) echo "sidbooth-probe: GET $path on port $port answered ${status:-nothing}" >&2; exit 1 ;;
esac
