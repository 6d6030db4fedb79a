"""The labelling page: one self-contained HTML file (thumbnails embedded, no server, no network).

The user names the classes, labels each picked image with a click or a key (1-9: the class at
that place; 0: clear; arrows: move), and downloads labels.csv (path,label), the file `edgessl
finetune --labels` reads. Work in progress survives a reload (the browser's local storage).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from edgessl.runfiles import atomic_write

THUMB = 160  # longest side of a thumbnail, pixels


def thumbnail(pool, i: int) -> str:
    """A data: URI of image i: the original file scaled to THUMB (array data: its pixels)."""
    from PIL import Image, ImageOps

    if pool.root is not None:
        with Image.open(pool.root / pool.names[i]) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    pixels = np.asarray(pool.data.images[i:i + 1][0].permute(1, 2, 0).contiguous().numpy())
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_page(pool, picks: list[int], out: Path) -> Path:
    items = [{"path": pool.names[i], "src": thumbnail(pool, i)} for i in picks]
    payload = json.dumps({"key": f"edgessl-labels:{out.resolve()}", "images": items}).replace("</", "<\\/")
    atomic_write(out, PAGE.replace("%TITLE%", html.escape(out.name)).replace("%DATA%", payload))
    return out


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Label %TITLE%</title>
<style>
body{font-family:sans-serif;margin:1em}
#bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}
.chip{display:inline-block;margin:2px;padding:2px 8px;border:1px solid #888;border-radius:10px;cursor:pointer}
#grid{display:flex;flex-wrap:wrap;gap:8px;margin-top:1em}
.card{width:180px;border:3px solid #ddd;padding:4px;cursor:pointer;font-size:12px;word-break:break-all}
.card img{width:170px;height:170px;object-fit:contain;image-rendering:pixelated;background:#eee}
.card.current{border-color:#06c}.card.done{background:#e8f5e8}.label{font-weight:bold}
</style></head><body>
<div id="bar">
<input id="newclass" placeholder="class name, Enter to add"> <button id="addclass">Add class</button>
<span id="classes"></span><br>
Keys: 1-9 label the current image with that class and go on; 0 clears; arrows move. Click an image to make it current.
<span id="count"></span> <button id="download">Download labels.csv</button>
</div>
<div id="grid"></div>
<script>
const DATA = %DATA%;
let classes = [], labels = {}, current = 0;
try { const s = JSON.parse(localStorage.getItem(DATA.key) || "null");
      if (s) { classes = s.classes; labels = s.labels; } } catch (e) {}
const grid = document.getElementById("grid");
DATA.images.forEach((im, i) => {
  const card = document.createElement("div");
  card.className = "card"; card.dataset.rank = i + 1;
  const img = document.createElement("img"); img.src = im.src; img.alt = im.path;
  const name = document.createElement("div"); name.textContent = (i + 1) + ". " + im.path;
  const lab = document.createElement("div"); lab.className = "label";
  card.append(img, name, lab);
  card.addEventListener("click", () => { current = i; render(); });
  grid.append(card);
});
function save() { try { localStorage.setItem(DATA.key, JSON.stringify({classes, labels})); } catch (e) {} }
function render() {
  const bar = document.getElementById("classes"); bar.innerHTML = "";
  classes.forEach((c, k) => {
    const chip = document.createElement("span"); chip.className = "chip"; chip.dataset.cls = c;
    chip.textContent = (k < 9 ? (k + 1) + " " : "") + c;
    chip.addEventListener("click", () => assign(c)); bar.append(chip);
  });
  [...grid.children].forEach((card, i) => {
    const l = labels[DATA.images[i].path];
    card.classList.toggle("current", i === current); card.classList.toggle("done", !!l);
    card.querySelector(".label").textContent = l || "";
  });
  const n = DATA.images.filter(im => labels[im.path]).length;
  document.getElementById("count").textContent = n + " of " + DATA.images.length + " labelled";
  const cur = grid.children[current]; if (cur && cur.scrollIntoView) cur.scrollIntoView({block: "nearest"});
  save();
}
function move(d) { current = Math.max(0, Math.min(DATA.images.length - 1, current + d)); }
function assign(c) { labels[DATA.images[current].path] = c; move(1); render(); }
function addClass() {
  const box = document.getElementById("newclass"), c = box.value.trim();
  if (c && !classes.includes(c)) classes.push(c);
  box.value = ""; render();
}
document.getElementById("addclass").addEventListener("click", addClass);
document.getElementById("newclass").addEventListener("keydown", e => { if (e.key === "Enter") addClass(); });
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") return;
  if (e.key >= "1" && e.key <= "9" && classes[+e.key - 1] !== undefined) assign(classes[+e.key - 1]);
  else if (e.key === "0" || e.key === "Backspace" || e.key === "Delete") {
    delete labels[DATA.images[current].path]; render(); }
  else if (e.key === "ArrowRight" || e.key === "ArrowDown") { move(1); render(); }
  else if (e.key === "ArrowLeft" || e.key === "ArrowUp") { move(-1); render(); }
  else return;
  e.preventDefault();
});
function cell(t) { return /[",\\r\\n]/.test(t) ? '"' + t.replace(/"/g, '""') + '"' : t; }
document.getElementById("download").addEventListener("click", () => {
  const rows = DATA.images.filter(im => labels[im.path]).map(im => cell(im.path) + "," + cell(labels[im.path]));
  const blob = new Blob(["path,label\\n" + rows.map(r => r + "\\n").join("")], {type: "text/csv"});
  const a = document.createElement("a"); a.href = URL.createObjectURL(blob); a.download = "labels.csv";
  document.body.append(a); a.click(); a.remove();
});
render();
</script></body></html>
"""
