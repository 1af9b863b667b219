import time, numpy as np
from relattn.backends import _numba_kernels as K
x=-np.abs(np.random.default_rng(0).standard_normal(1<<22).astype(np.float32))*10
o=np.empty_like(x); K.exp_array(x,o)
ts=[]
for _ in range(10):
    t=time.perf_counter(); K.exp_array(x,o); ts.append(time.perf_counter()-t)
print("exp f32 G/s single thread", x.size/min(ts)/1e9)
asm=list(K.exp_array.inspect_asm().values())[0]
print("ymm fma count", asm.count('vfmadd'), 'ymm' in asm, asm.count('call'))
