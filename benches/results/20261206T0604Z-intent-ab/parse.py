import json, sys
text = sys.stdin.read()
if "{" not in text:
    print("no-json:" + text[:200].replace("\n", " "))
    sys.exit(0)
j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
p50 = j["clat_ns"]["percentile"]["50.000000"] / 1000
print("%.0fMiB/s %.0fiops p50=%.0fus" % (j["bw"] / 1024, j["iops"], p50))
