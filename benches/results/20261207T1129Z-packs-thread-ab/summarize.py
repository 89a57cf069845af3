#!/usr/bin/env python3
"""One line per run of benches/backup-bench.sh in this directory: full backup and
restore seconds and their ratios to nbdcopy, the scattered incremental's read % and
time %, the CLI's CPU for the full backup, the load before the first and last step."""
import glob, json, os, re, sys
d = os.path.dirname(os.path.abspath(__file__))
for f in sorted(glob.glob(os.path.join(d, "[0-9]-*.txt"))):
    t = open(f).read()
    def step(k):
        return json.loads(re.search(r"^" + k + r" (\{.*\})$", t, re.M).group(1))
    nr = float(re.search(r"volume->file s ([\d.]+)", t).group(1))
    nw = float(re.search(r"file->volume s ([\d.]+)", t).group(1))
    full, rest, inc = step("full")["seconds"], step("restore")["seconds"], step("incr-164x64k")
    cpu = re.search(r"cpu full client-user ([\d.]+) client-sys ([\d.]+)", t)
    loads = re.findall(r"^load ([\d.]+)", t, re.M)
    print(f"{os.path.basename(f):10} nbdcopy-r {nr:.2f} full {full:.2f} ({nr/full:.2f}x) "
          f"cli user/sys {cpu.group(1)}/{cpu.group(2)} | restore {rest:.2f} nbdcopy-w {nw:.2f} "
          f"({nw/rest:.2f}x) | incr164 read {100*inc['bytes_read']/2**30:.1f}% "
          f"time {100*inc['seconds']/full:.1f}% | load {loads[0]}..{loads[-1]}")
