"""Bytes autograd saves per token for one decoder layer of ferrotune's model (trainer/src/model.rs),
replicated op by op in PyTorch (the same ATen ops: fp32 RMSNorm, linear, LoRA dropout, rotary, one causal
SDPA per document, SiLU MLP) on SmolLM2-135M's shape, summed over the distinct storages that
torch.autograd.graph.saved_tensors_hooks sees (parameters and rotary tables left out). The memory planner's
per-layer count (trainer/src/memory.rs, layer_bytes_per_token) is checked against what this prints.

  python benches/saved_bytes.py [TOKENS=2048] [lora|full]
"""
import torch, sys
torch.manual_seed(0)
C,F,H,K,D,r=576,1536,9,3,64,8
T=int(sys.argv[1]) if len(sys.argv)>1 else 2048
mode=sys.argv[2] if len(sys.argv)>2 else "lora"
docs=[T//3, T//3, T-2*(T//3)]
def P(*s, train): return torch.randn(*s)*0.02 if not train else (torch.randn(*s)*0.02).requires_grad_()
full = mode=="full"
W={n:P(o,i,train=full) for n,(o,i) in dict(q=(H*D,C),k=(K*D,C),v=(K*D,C),o=(C,H*D),g=(F,C),u=(F,C),d=(C,F)).items()}
ln1=P(C,train=full); ln2=P(C,train=full)
A={n:P(r,W[n].shape[1],train=True) for n in W}; B={n:P(W[n].shape[0],r,train=True) for n in W}
def lin(n,x):
    y=torch.nn.functional.linear(x,W[n])
    if mode=="lora":
        xd=torch.nn.functional.dropout(x,0.05,True)
        y=y+torch.nn.functional.linear(torch.nn.functional.linear(xd,A[n]),B[n])*2.0
    return y
def norm(w,x):
    x32=x.float(); var=x32.square().mean(-1,keepdim=True)
    return w*(x32*torch.rsqrt(var+1e-5)).to(x.dtype)
pos=torch.cat([torch.arange(n) for n in docs]).unsqueeze(0).float()
inv=1/(10000**(torch.arange(0,D,2).float()/D)); fr=pos.unsqueeze(-1)*inv; emb=torch.cat([fr,fr],-1); cos,sin=emb.cos(),emb.sin()
def rope(x):
    x1,x2=x[...,:D//2],x[...,D//2:]
    return x*cos.unsqueeze(1)+torch.cat([-x2,x1],3)*sin.unsqueeze(1)
saved={}
def pack(t):
    try: key=(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    except Exception: key=(id(t),t.numel()*t.element_size())
    saved[key]=(key[1], tuple(t.shape), str(t.dtype)); return t
x=torch.randn(1,T,C).requires_grad_()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t:t):
    h=norm(ln1,x)
    q=lin('q',h).view(1,T,H,D).transpose(1,2); k=lin('k',h).view(1,T,K,D).transpose(1,2); v=lin('v',h).view(1,T,K,D).transpose(1,2)
    q,k=rope(q),rope(k)
    outs=[]; at=0
    for n in docs:
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[:,:,at:at+n],k[:,:,at:at+n],v[:,:,at:at+n],is_causal=True,scale=D**-0.5,enable_gqa=True)); at+=n
    y=torch.cat(outs,2)
    x1=x+lin('o',y.transpose(1,2).reshape(1,T,H*D))
    h2=norm(ln2,x1)
    out=x1+lin('d',torch.nn.functional.silu(lin('g',h2))*lin('u',h2))
param_bytes=sum(t.numel()*4 for t in list(W.values())+list(A.values())+list(B.values())+[ln1,ln2,cos,sin])
import collections
pids={(t.untyped_storage().data_ptr()) for t in list(W.values())+list(A.values())+list(B.values())+[ln1,ln2,cos,sin]}
c=collections.Counter()
for k,(b,sh,dt) in saved.items():
    if k[0] in pids: continue
    c[(sh,dt)]+=b/T
for k,v in sorted(c.items(), key=lambda kv:-kv[1]): print(k, round(v))
tot=sum(v[0] for v in saved.values())
print(mode, T, "saved bytes/token (params and rope tables excluded, approx):", (tot-param_bytes)/T)
