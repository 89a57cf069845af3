import json,sys,glob,re,os
rows=[]
for f in sorted(glob.glob(sys.argv[1]+'/run-*.txt')):
    t=open(f).read().splitlines()
    d={}
    loads=[]
    for l in t:
        if l.startswith('load '): loads.append(float(l.split()[1]))
        m=re.match(r'^(full|incr-3-chunks|incr-164x64k|restore) (\{.*\})$',l)
        if m: d[m.group(1)]=json.loads(m.group(2))
        m=re.match(r'^nbdcopy volume->file s (\S+)',l)
        if m: d['nv']=float(m.group(1))
        m=re.match(r'^nbdcopy file->volume s (\S+)',l)
        if m: d['nf']=float(m.group(1))
        m=re.match(r'^== round (\d+) chunk (\S+) sync (\S+)',l)
        if m: d['round'],d['cs'],d['lvl']=m.groups()
    if 'nf' not in d: continue
    full=d['full']['seconds']; inc=d['incr-164x64k']; i3=d['incr-3-chunks']
    rows.append((int(d['round']),d['cs'],d['lvl'],full,d['nv'],d['nv']/full,d['restore']['seconds'],d['nf'],d['nf']/d['restore']['seconds'],
      inc['bytes_read']/2**20,inc['bytes_read']/2**30*100,inc['seconds'],inc['seconds']/full*100,i3['seconds'],i3['seconds']/full*100,min(loads),max(loads)))
print('| round | chunk | sync level | full backup | nbdcopy vol→file | full ratio | restore | nbdcopy file→vol | restore ratio | incr 164×64 KiB: read | time | ÷ full | incr 3×4 MiB | ÷ full | load |')
print('|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|')
for r in rows:
    print('| %d | %s | %s | %.2f s | %.2f s | %.2f× | %.2f s | %.2f s | %.2f× | %.1f MiB (%.1f %%) | %.3f s | %.1f %% | %.3f s | %.1f %% | %.1f–%.1f |'%r)
