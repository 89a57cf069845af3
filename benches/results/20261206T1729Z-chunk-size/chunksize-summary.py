import json,sys,glob,re
from collections import defaultdict
g=defaultdict(list)
for f in sorted(glob.glob(sys.argv[1]+'/run-*.txt')):
    t=open(f).read().splitlines(); d={}; loads=[]
    for l in t:
        if l.startswith('load '): loads.append(float(l.split()[1]))
        m=re.match(r'^(full|incr-3-chunks|incr-164x64k|restore) (\{.*\})$',l)
        if m: d[m.group(1)]=json.loads(m.group(2))
        m=re.match(r'^nbdcopy volume->file s (\S+)',l)
        if m: d['nv']=float(m.group(1))
        m=re.match(r'^nbdcopy file->volume s (\S+)',l)
        if m: d['nf']=float(m.group(1))
        m=re.match(r'^== round (\d+) chunk (\S+) sync (\S+)',l)
        if m: d['round'],d['cs'],d['lvl']=int(m.group(1)),m.group(2),m.group(3)
    if 'nf' not in d: continue
    fs='own ext4 (loop)' if d['round']>=6 else 'root ext4'
    if d['round']==1: continue  # older compression sampling
    if d['round']<=5: fs='root ext4'
    full=d['full']['seconds']; inc=d['incr-164x64k']
    g[(fs,d['cs'],d['lvl'])].append(dict(full=full,fr=d['nv']/full,rest=d['restore']['seconds'],rr=d['nf']/d['restore']['seconds'],
        ib=inc['bytes_read']/2**30*100,it=inc['seconds'],ip=inc['seconds']/full*100,st=inc['bytes_stored']/2**20,load=(min(loads),max(loads)),n=d['round']))
def rng(v,fmt):
    a,b=min(v),max(v)
    return (fmt%a) if fmt%a==fmt%b else (fmt%a)+'–'+(fmt%b)
print('| repository on | chunk | CLI | runs | full backup | ÷ nbdcopy | restore | ÷ nbdcopy | incr 164×64 KiB read | stored | time | ÷ full | load |')
print('|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|')
order={'64K':0,'256K':1,'1M':2,'4M':3}
for k in sorted(g,key=lambda k:(k[0],order[k[1]],k[2])):
    v=g[k]
    cli={'filesystem':'new, filesystem','file':'new, file','base':'main'}[k[2]]
    print('| %s | %s | %s | %s | %s s | %s× | %s s | %s× | %s %% | %s MiB | %s s | %s %% | %s |'%(k[0],k[1],cli,','.join(str(x['n']) for x in v),
        rng([x['full'] for x in v],'%.2f'),rng([x['fr'] for x in v],'%.2f'),rng([x['rest'] for x in v],'%.2f'),rng([x['rr'] for x in v],'%.2f'),
        rng([x['ib'] for x in v],'%.1f'),rng([x['st'] for x in v],'%.0f'),rng([x['it'] for x in v],'%.2f'),rng([x['ip'] for x in v],'%.1f'),
        rng([x['load'][0] for x in v]+[x['load'][1] for x in v],'%.1f')))
