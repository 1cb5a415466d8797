"""Writes the seed corpus of every fuzz target into fuzz/seeds/<target>/: small valid inputs
from which mutations start. Run from the repository root after `cargo xtask train` (the
checkpoint, architecture and burnpack seeds are the demo run's own files)."""
import io, os, struct, tarfile, zlib, shutil

root = os.path.join("fuzz", "seeds")
run = os.path.join("runs", "mnist-demo")

def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

record = bytes([3]) + bytes((i * 7) % 256 for i in range(3072))
put("cifar", "cifar10", bytes([0, 1]) + record)
put("cifar", "cifar100", bytes([1, 0, 5, 42]) + record[1:])

def tar_gz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

folder = "cifar-10-batches-bin/"
members = [(folder + f"data_batch_{i}.bin", record) for i in range(1, 6)]
members += [(folder + "test_batch.bin", record), (folder + "batches.meta.txt", b"\n".join(b"c%d" % i for i in range(10)))]
put("cifar_archive", "all", tar_gz(members))
put("cifar_archive", "test_only", tar_gz(members[5:]))

put("idx", "rank3", bytes([0, 0, 8, 3]) + struct.pack(">III", 1, 2, 2) + bytes(range(4)))
put("idx", "rank1", bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([1, 2, 3]))

def png(w, h, rgb):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + rgb * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
put("image", "png", png(3, 2, b"\x10\x80\xf0"))
try:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buf, format="JPEG", quality=90)
    put("image", "jpeg", buf.getvalue())
except ImportError:
    pass

for name in ["mnist-demo.toml", "resnet56-cifar10.toml"]:
    p = os.path.join("configs", name)
    if os.path.exists(p):
        put("config", name, open(p, "rb").read())

put("architecture", "demo", open(os.path.join(run, "architecture.json"), "rb").read())
put("checkpoint", "progress", b"\x00" + open(os.path.join(run, "checkpoint", "progress.json"), "rb").read())
put("checkpoint", "sums", b"\x01" + open(os.path.join(run, "checkpoint", "SHA256SUMS"), "rb").read())
put("burnpack", "pruned", open(os.path.join(run, "pruned", "model.bpk"), "rb").read())
