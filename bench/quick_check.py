import time, numpy as np, sys
t=time.time()
from relattn.backends import _numba_kernels as K
print("import", time.time()-t)
rng=np.random.default_rng(0)
x=(rng.standard_normal(100000)*30).astype(np.float32); x=np.minimum(x, 80)
o=np.empty_like(x); t=time.time(); K.exp_array(x,o); print("exp compile", time.time()-t)
ref=np.exp(x.astype(np.float64)); print("exp f32 max rel", np.max(np.abs(o-ref)/np.maximum(ref,1e-300)*(ref>1e-37)))
x64=x.astype(np.float64)*8; x64=np.minimum(x64,700); o64=np.empty_like(x64); K.exp_array(x64,o64); r64=np.exp(x64)
print("exp f64 max rel", np.max(np.abs(o64-r64)/np.maximum(r64,1e-300)*(r64>1e-300)))
def ref_attn(q,k,v,rh,rw,kw,scale):
    q,k,v=[a.astype(np.float64) for a in (q,k,v)]
    l=scale*q@k.swapaxes(-1,-2)
    if rh is not None:
        BH,Sq,kh=rh.shape
        l=l+(rh[...,:,:,None]+rw[...,:,None,:]).reshape(BH,Sq,-1)
    l-=l.max(-1,keepdims=True); p=np.exp(l); p/=p.sum(-1,keepdims=True); return p@v
for dt in (np.float32,np.float64):
  for (BH,Sq,kh,kw,d) in [(3,50,7,9,16),(2,196,14,14,64),(1,1,1,1,1),(2,100,3,5,80)]:
    Sk=kh*kw
    q=rng.standard_normal((BH,Sq,d)).astype(dt);k=rng.standard_normal((BH,Sk,d)).astype(dt);v=rng.standard_normal((BH,Sk,d)).astype(dt)
    rh=rng.standard_normal((BH,Sq,kh)).astype(dt);rw=rng.standard_normal((BH,Sq,kw)).astype(dt)
    out=np.empty_like(q); t=time.time()
    K.attention_fwd(q,k,v,rh,rw,True,kw,dt(d**-0.5),32,48,out); el=time.time()-t
    r=ref_attn(q,k,v,rh,rw,kw,d**-0.5)
    print(dt.__name__,BH,Sq,Sk,d, "err", np.abs(out-r).max()/np.abs(r).max(), "t", el)
