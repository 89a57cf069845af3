#!/bin/bash
# clear vs TLS on nbdkit (GnuTLS server) for reference: the 1M write job of tls-ab.sh.
# Usage: benches/tls-nbdkit-reference.sh "memory 1G"  (needs /tmp/tlsbench/pki from `mirrorblk certs init`)
D=/tmp/tlsbench; PORT=22811
nbdkit -f -p $PORT -i 127.0.0.1 --tls=on --tls-certificates=$D/pki $1 &
P=$!; sleep 2
for r in 1 2 3; do
 for mode in clear tls; do
  uri="nbd://127.0.0.1:$PORT"; [ $mode = tls ] && uri="nbds://127.0.0.1:$PORT?tls-verify-peer=false"
  fio --name=b --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 --size=1g --time_based --ramp_time=1 --runtime=5 --output-format=json --output=$D/nk.json >/dev/null 2>&1
  python3 -c "import json;w=json.load(open('$D/nk.json'))['jobs'][0]['write'];print('$mode-1m-r$r', round(w['bw']/1024))"
 done
done
kill $P
