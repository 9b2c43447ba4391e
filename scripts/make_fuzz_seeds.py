"""Seed corpus of the fuzz harnesses (crates/fuzz): small valid inputs of every format each
harness reads, plus the crafted files the fuzzer found problems with. Run with the fixtures venv
(Pillow, numpy, torch, safetensors, gguf):

    python scripts/make_fuzz_seeds.py
"""
import io, os, json, struct, base64
import numpy as np
from PIL import Image
ROOT=os.path.join(os.path.dirname(os.path.abspath(__file__)),"..")
R=os.path.join(ROOT,"fixtures/fuzz")
def d(name):
    p=os.path.join(R,name); os.makedirs(p,exist_ok=True)
    for f in os.listdir(p): os.remove(os.path.join(p,f))
    return p
rng=np.random.default_rng(0)
def img(w,h,mode="RGB"):
    a=rng.integers(0,255,(h,w,3),dtype=np.uint8)
    a[:h//2]=(a[:h//2]//4)+100
    im=Image.fromarray(a,"RGB")
    return im.convert(mode) if mode!="RGB" else im
def save(im, fmt, **kw):
    b=io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()
# JPEG decoder seeds
j=d("jpeg")
seeds={
 "baseline-420.jpg": save(img(16,16),"JPEG",quality=80),
 "baseline-444.jpg": save(img(16,8),"JPEG",quality=90,subsampling=0),
 "baseline-422-odd.jpg": save(img(17,11),"JPEG",quality=70,subsampling=1),
 "gray.jpg": save(img(16,16,"L"),"JPEG",quality=75),
 "progressive.jpg": save(img(16,16),"JPEG",quality=80,progressive=True),
 "progressive-gray.jpg": save(img(9,13,"L"),"JPEG",progressive=True),
 "restart.jpg": save(img(32,16),"JPEG",quality=60,restart_marker_blocks=1),
 "optimized.jpg": save(img(16,16),"JPEG",optimize=True),
}
for k,v in seeds.items(): open(os.path.join(j,k),"wb").write(v)
# input images: every format the APIs take
i=d("input-image")
rgba=img(12,10).convert("RGBA"); a=np.array(rgba); a[:, :6, 3]=0; rgba=Image.fromarray(a,"RGBA")
inp={
 "rgb.png": save(img(8,8),"PNG"),
 "rgba.png": save(rgba,"PNG"),
 "gray.png": save(img(8,6,"L"),"PNG"),
 "palette.png": save(img(8,8).convert("P"),"PNG"),
 "bilevel.png": save(img(8,8,"1"),"PNG"),
 "gray16.png": save(Image.fromarray((np.arange(64).reshape(8,8)*900).astype(np.uint16)),"PNG"),
 "lossless.webp": save(img(8,8),"WEBP",lossless=True),
 "lossy.webp": save(img(8,8),"WEBP",quality=50),
 "alpha.webp": save(rgba,"WEBP",lossless=True),
 "photo.jpg": seeds["baseline-420.jpg"],
 "gray.jpg": seeds["gray.jpg"],
}
for k,v in inp.items(): open(os.path.join(i,k),"wb").write(v)
# base64 text of images (data URLs too)
b=d("base64")
open(os.path.join(b,"plain.txt"),"wb").write(base64.b64encode(inp["rgb.png"]))
open(os.path.join(b,"data-url.txt"),"wb").write(b"data:image/png;base64,"+base64.b64encode(inp["gray.png"]))
open(os.path.join(b,"wrapped.txt"),"wb").write(base64.encodebytes(inp["lossless.webp"]))
# safetensors headers
import torch
from safetensors.torch import save as st_save
s=d("safetensors")
open(os.path.join(s,"one.safetensors"),"wb").write(st_save({"w": torch.zeros(2,3)}))
open(os.path.join(s,"dtypes.safetensors"),"wb").write(st_save({"a": torch.ones(4,dtype=torch.float16),"b": torch.ones(2,2,dtype=torch.bfloat16),"c": torch.arange(3,dtype=torch.int64),"d":torch.zeros(0)}, metadata={"format":"pt","ss_network_alpha":"4"}))
open(os.path.join(s,"lora-like.safetensors"),"wb").write(st_save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2,4),"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4,2),"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}))
open(os.path.join(s,"empty.safetensors"),"wb").write(st_save({}))
# Regressions: safetensors headers that claim what the file does not hold.
def st_raw(name, header, data, n=None):
    h=json.dumps(header).encode()
    open(os.path.join(s,name),"wb").write(struct.pack("<Q", len(h) if n is None else n)+h+data)
st_raw("regression-huge-tensor.safetensors", {"t":{"dtype":"F32","shape":[1<<40],"data_offsets":[0,4<<40]}}, b"\0"*8)
st_raw("regression-offset-past-end.safetensors", {"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}, b"\0"*4)
st_raw("regression-header-length.safetensors", {"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}, b"\0"*4, n=1<<40)
# GGUF headers (small files, as the FLUX loader reads them)
g=d("gguf")
import shutil
for q in ["Q4_0","Q8_0"]:
    shutil.copy(os.path.join(ROOT,f"fixtures/flux/transformer-q-{q}.gguf"), os.path.join(g,f"tiny-flux-{q}.gguf"))
import gguf
w=gguf.GGUFWriter(os.path.join(g,"small.gguf"),"flux")
w.add_uint32("general.alignment",32); w.add_string("general.name","x"); w.add_array("a",[1,2,3])
w.add_tensor("img_in.weight", np.zeros((4,8),dtype=np.float32))
w.add_tensor("t", np.zeros((3,),dtype=np.float16))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def mk(name, tensors, align=32):
    w=gguf.GGUFWriter(os.path.join(g,name),"flux")
    w.add_uint32("general.alignment",align)
    for k,v in tensors: w.add_tensor(k,v)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
# Regressions: candle's reader divides by a zero alignment, slices an empty buffer as blocks,
# and multiplies a claimed shape without overflow checks.
mk("regression-alignment-zero.gguf",[("t",np.zeros((4,),dtype=np.float32))],align=0)
mk("regression-no-elements.gguf",[("t",np.zeros((0,4),dtype=np.float32))])
mk("regression-huge-shape.gguf",[("t",np.zeros((3,5),dtype=np.float32))])
p=os.path.join(g,"regression-huge-shape.gguf"); b=bytearray(open(p,"rb").read())
i=b.find(struct.pack("<QQ",5,3)); assert i>0
b[i:i+16]=struct.pack("<QQ",1<<40,1<<40)
open(p,"wb").write(b)

# LoRA key listings (`KEY DIM...` per line, `@KEY=VALUE` metadata): whole modules spread over
# the fixture LoRAs.
lk=d("lora-keys")
for f in ["sd1-kohya","sd1-peft","sdxl-kohya","flux-kohya"]:
    b=open(os.path.join(ROOT,f"fixtures/lora/{f}.safetensors"),"rb").read()
    n=struct.unpack("<Q",b[:8])[0]; h=json.loads(b[8:8+n])
    meta=h.pop("__metadata__",None)
    lines=["@format="+meta["format"]] if meta and "format" in meta else []
    module=lambda k: k.rsplit(".",2)[0] if ".lora_" in k else k.rsplit(".",1)[0]
    mods=sorted({module(k) for k in h})
    pick=set(mods[::max(1,len(mods)//14)])
    for k in sorted(h):
        if module(k) in pick: lines.append(" ".join([k]+[str(x) for x in h[k]["shape"]]))
    open(os.path.join(lk,f+".txt"),"w").write("\n".join(lines)+"\n")

# Request bodies of each API.
png=base64.b64encode(inp["rgb.png"]).decode()
gray=base64.b64encode(inp["gray.png"]).decode()
rec=lambda api,n: base64.b64decode(json.load(open(os.path.join(ROOT,f"crates/server/tests/fixtures/{api}/{n}.json")))["body_b64"])
a=d("a1111-request")
for n in ["txt2img","txt2img_defaults"]:
    open(os.path.join(a,n+".json"),"wb").write(rec("a1111",n))
img={"prompt":"a <lora:style:0.5>","steps":2,"width":8,"height":8,"init_images":[png],"denoising_strength":0.5,"mask":gray,"mask_blur":0,"sampler_name":"Euler a","seed":-1,"batch_size":2,"n_iter":1,"override_settings":{"CLIP_stop_at_last_layers":1}}
open(os.path.join(a,"img2img.json"),"w").write(json.dumps(img))
o=d("openai-request")
for n in ["generations","generations_jpeg","generations_url"]:
    open(os.path.join(o,n+".json"),"wb").write(rec("openai",n))
open(os.path.join(o,"extensions.json"),"w").write(json.dumps({"prompt":"a","size":"8x8","n":2,"steps":3,"seed":5,"sampler":"euler","schedule":"karras","negative_prompt":"b","guidance_scale":4.5,"loras":[{"path":"x","strength":0.5}],"output_format":"webp","output_compression":50}))
nat=d("native-request")
G={"operation":"image_generation","prompt":"a","negative_prompt":"b","width":8,"height":8,"steps":3,"guidance_scale":7.5,"seed":1,"scheduler":"euler-a","batch":2,"preview_every":1,"preview":"full","hive_id":"h","worker_id":"w"}
open(os.path.join(nat,"generation.json"),"w").write(json.dumps(G))
open(os.path.join(nat,"transform.json"),"w").write(json.dumps({"operation":"image_transform","prompt":"a","input_image":png,"strength":0.5,"steps":2}))
open(os.path.join(nat,"inpaint.json"),"w").write(json.dumps({"operation":"image_inpaint","prompt":"a","init_image":png,"mask_image":"data:image/png;base64,"+gray,"loras":[{"path":"s","strength":0.5,"strict":False}]}))
open(os.path.join(nat,"sdxl.json"),"w").write(json.dumps({"operation":"image_generation","prompt":"a","original_size":[1024,1024],"crops_coords_top_left":[0,0],"target_size":[8,8],"aesthetic_score":6,"max_sequence_length":77,"prompt_syntax":"a1111","sampler":"dpmpp-2m","schedule":"karras","eta":0.5,"s_noise":1.0}))
