"""A Gradio web demo of a `ClipCap` model: drop images (or paste URLs), choose the decoding, read captions.

``python main.py serve --model coco [--host 127.0.0.1] [--port 7860]`` starts it. The model is loaded and
compiled once at start-up (a warm-up caption), requests are queued one at a time (two decodes at once on
the same cores would only slow each other down), uploads are bounded in size (``max_file_bytes``), decoded
images in pixels (``max_pixels`` each, ``max_request_pixels`` for a request's images together: those that do
not fit in what is left are error rows, dropped at once), and every image gets its own result: a file that is not an
image, too large, or a URL that cannot be fetched is an error row in the page, never a crash.

The URL box is read as a stranger's input (`utils.safe_fetch.fetch_untrusted`): http(s) URLs only, never a
server path, and only from public addresses (checked after name resolution and at every redirect) unless
the operator passes ``allow_private_urls`` (``serve --allow-private-urls``); every URL that is not fetched
gets the same message (`utils.safe_fetch.REFUSED`), so a visitor learns nothing about the server's files or
network. All the URLs of one request are fetched within ``URL_BUDGET_S`` seconds. Gradio's analytics
(telemetry and version checks to api.gradio.app) are off.

The same server answers Gradio's API (``gradio_client.Client(url).predict(files, ..., api_name="/caption")``).

Example::

    demo = build_demo(ClipCap.load("coco"))
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=7860)
"""

import base64
import html
import io
import logging
import os
import time

from PIL import Image

from custom_architectures.decoding import request_options
from custom_architectures.decoding_options import SEVERAL_CAPTIONS_OPTIONS
from custom_architectures.samplers import SAMPLERS, several_caption_methods
from utils.image_io import ImageReadError, read_image
from utils.safe_fetch import URLRefused, fetch_untrusted

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_IMAGES = 16
#: the most pixels (width x height, summed) of one request's images, by default: twice ``max_pixels``. Each
#: image decoded is held until the request ends; without this bound, 16 uploads of 164 kB (RGBA PNGs of 40
#: megapixels) held 2.4 GB before any caption. Images are admitted in order while they fit, as the serving
#: graph admits rows (`models.image_captioning.serving_ops.admit`)
REQUEST_PIXELS_FACTOR = 2
#: characters of the URL box (and of the hidden note of refused uploads) read: a request with a longer URL
#: text is refused before it is split
MAX_URL_TEXT = 64 * 1024
#: seconds for fetching all the URLs of one request (requests queue one at a time: one visitor's slow URLs
#: must not hold the others for long)
URL_BUDGET_S = 30.0
THUMBNAIL = 160
#: long captions and file names wrap inside the results table instead of widening it past the page
CSS = """
#results table { table-layout: fixed; width: 100%; }
#results td, #results th { overflow-wrap: anywhere; word-break: break-word; white-space: normal; vertical-align: top; }
#results tr > :first-child { width: 180px; }
#results tr > :last-child { width: 120px; }
#results img { max-width: 100%; }
"""

logger = logging.getLogger(__name__)


def _thumbnail(image):
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _render(rows, total_s):
    """The results as an HTML table (every string escaped)."""
    out = [f'<div id="results"><p>{len(rows)} image(s) in {total_s * 1000:.0f} ms</p><table>',
           "<tr><th>image</th><th>captions (score: mean log-prob)</th><th>time</th></tr>"]
    for row in rows:
        name = html.escape(row["name"])
        if row["error"] is not None:
            out.append(f'<tr class="error"><td>{name}</td><td style="color:#c00">error: '
                       f'{html.escape(row["error"])}</td><td></td></tr>')
            continue
        captions = "".join(f'<li><span class="caption">{html.escape(c["text"])}</span> '
                           f'<small>({c["score"]:.3f}'
                           + (f', CLIPScore {c["clip_score"]:.3f}' if "clip_score" in c else "")
                           + ")</small></li>" for c in row["candidates"])
        timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row["timings"].items())
        out.append(f'<tr class="ok"><td><img src="{row["thumbnail"]}" alt="{name}"><br>{name}</td>'
                   f"<td><ol>{captions}</ol></td><td><small>{html.escape(timing)}</small></td></tr>")
    out.append("</table></div>")
    return "\n".join(out)


def describe_model(model) -> str:
    """The model in words for the page's header: name, CLIP, mapper and GPT-2 (not a Python repr)."""
    clip = model.clip
    if clip is None:
        clip_text = "no CLIP image encoder"
    else:
        kind = "ResNet" if type(clip.visual).__name__ == "ModifiedResNet" else "ViT"
        official = model.info.get("clip_name")
        clip_text = (f"CLIP {official}" if official else f"CLIP {kind}") + \
            f" image encoder ({clip.input_resolution} px, {clip.embed_dim}-d embedding)"
    mapper = model.config["mapping_type"]
    mapper_text = f"{'MLP' if mapper == 'mlp' else mapper} mapper ({model.prefix_length} prefix tokens)"
    gpt2 = model.gpt2
    gpt2_text = f"GPT-2 ({gpt2.n_layer} layers, width {gpt2.n_embd}, {gpt2.vocab_size:,} tokens)"
    return f"{model.name}: {clip_text} → {mapper_text} → {gpt2_text}"


def demo_options():
    """``{name: (Option, methods)}``: the decoding options the page has a control for (those declared with a
    `decoding_options.Control`), in the order of the ``/caption`` API's arguments after the method, each with
    the methods that show it: those taking it, or for an option of every method, all of them (those giving
    several captions for `SEVERAL_CAPTIONS_OPTIONS`). Read from the registry at each call: a method
    registered later is on the next page built."""
    shown = {}
    for option in request_options():
        if option.control is None:
            continue
        methods = tuple(name for name, cls in SAMPLERS.items() if option in cls.options)
        if not methods:
            methods = several_caption_methods() if option in SEVERAL_CAPTIONS_OPTIONS else tuple(SAMPLERS)
        shown[option.name] = (option, methods)
    return shown


def control_value(option, value):
    """A control's value as the option's: a checkbox gives its single choice or None, a slider a number of
    the option's type."""
    if value is None:
        return None
    if option.choices is not None and len(option.choices) == 1:
        return option.choices[0] if value else None
    return option.type(value)


def _control(gr, option, visible):
    """The Gradio component of ``option`` (`decoding_options.Control`): a checkbox for a single choice, else a
    slider; its elem_id is the option's name with dashes (``beam-size``)."""
    control = option.control
    label, elem_id = control.label or option.name.replace("_", " "), option.name.replace("_", "-")
    if option.choices is not None and len(option.choices) == 1:
        return gr.Checkbox(value=bool(control.value), label=label, elem_id=elem_id, visible=visible)
    value = option.default if control.value is None else control.value
    return gr.Slider(control.minimum, control.maximum, value=value, step=control.step, label=label,
                     elem_id=elem_id, visible=visible)


def _visibility(method):
    """One ``gr.update(visible=...)`` per control of `demo_options` (in its order) for ``method``."""
    import gradio as gr

    return [gr.update(visible=method in methods) for _, methods in demo_options().values()]


def _summary(rows, refused=()):
    """The structured results, as the JSON output (and gradio_client) gives them."""
    return {"results": [_summary_row(r) for r in rows], "errors": sum(r["error"] is not None for r in rows)}


def _summary_row(row):
    """One image's structured result: its captions and scores (and CLIPScores when CLIP chose them)."""
    candidates = row.get("candidates", [])
    summary = {"name": row["name"], "error": row["error"], "captions": [c["text"] for c in candidates],
               "scores": [c["score"] for c in candidates]}
    if any("clip_score" in c for c in candidates):
        summary["clip_scores"] = [c.get("clip_score") for c in candidates]
    return summary


class Captioner:
    """The demo's work, without Gradio: bounded reading, then `ClipCap.predict` on the images that read."""

    def __init__(self, model, max_file_bytes=MAX_FILE_BYTES, max_pixels=MAX_PIXELS, max_images=MAX_IMAGES,
                 allow_private_urls=False, url_budget_s=URL_BUDGET_S, max_request_pixels=None):
        self.model, self.max_file_bytes, self.max_pixels, self.max_images = \
            model, max_file_bytes, max_pixels, max_images
        self.max_request_pixels = REQUEST_PIXELS_FACTOR * max_pixels if max_request_pixels is None \
            else max_request_pixels
        self.allow_private_urls, self.url_budget_s = allow_private_urls, url_budget_s

    def warm_up(self):
        """Compile the greedy path for one image at start-up, not at the first visitor's request: under
        ``jit_compile="auto"`` a shape's first call runs uncompiled and its second compiles."""
        image = Image.new("RGB", (64, 48), (120, 60, 30))
        for _ in range(2):
            self.model.caption([image])

    def _read_url(self, text, deadline):
        """The image at a visitor's URL: fetched as untrusted (a path, another scheme or a non-public address
        is refused with the one message) by ``deadline``, then decoded within the pixel limit."""
        data = fetch_untrusted(text, max_bytes=self.max_file_bytes, timeout=deadline - time.monotonic(),
                               allow_private=self.allow_private_urls)
        return read_image(data, max_pixels=self.max_pixels)

    def _read(self, files, urls):
        # uploaded files are Gradio's own copies (paths it checked); the URL box is untrusted text
        files = [str(f) for f in files or []]
        sources = [(name, lambda n=name: read_image(n, max_pixels=self.max_pixels, max_bytes=self.max_file_bytes))
                   for name in files]
        if len(sources) > self.max_images:
            raise ValueError(f"at most {self.max_images} images per request, got {len(sources)}")
        urls = urls or ""
        if len(urls) > MAX_URL_TEXT:  # before splitting: a huge text would cost its size many times over
            raise ValueError(f"the URL box holds {len(urls)} characters, more than {MAX_URL_TEXT}: at most "
                             f"{self.max_images} URLs per request")
        room = self.max_images - len(sources)
        texts = urls.split(maxsplit=room)  # at most room + 1 pieces: one too many tells too many URLs
        if len(texts) > room:
            raise ValueError(f"at most {self.max_images} images per request (files and URLs together), got more")
        deadline = time.monotonic() + self.url_budget_s  # for all the URLs together
        sources += [(text, lambda t=text: self._read_url(t, deadline)) for text in texts]
        images, used = [], 0
        for name, read in sources:
            short = name.rsplit("/", 1)[-1]
            try:
                image = read()
            except URLRefused as e:
                images.append((short, None, str(e)))
                continue
            except ImageReadError as e:
                images.append((short, None, str(e).replace(str(name), short)))
                continue
            pixels = image.size[0] * image.size[1]
            if used + pixels > self.max_request_pixels:  # dropped now: at most the bound plus one image held
                images.append((short, None, f"{short}: {image.size[0]}x{image.size[1]} = {pixels} pixels do not fit "
                                            f"in the {self.max_request_pixels} pixels of a request ({used} taken "
                                            "by the images before it): send it in another request"))
                continue
            used += pixels
            images.append((short, image, None))
        return images

    def caption(self, files, urls="", method="greedy", **controls):
        """Rows ``{name, error, candidates, timings, thumbnail}`` for uploaded files and URLs; ``controls``: the
        values of the page's controls by option name (`demo_options`; ``rerank``: a checkbox, choose the
        captions by CLIPScore, `models.image_captioning.rerank`). Only the controls ``method`` shows apply: a
        hidden one left set is ignored."""
        kwargs = {name: control_value(option, controls[name]) for name, (option, methods) in demo_options().items()
                  if name in controls and method in methods}
        start = time.perf_counter()
        images = self._read(files, urls)
        read_s = time.perf_counter() - start
        good = [image for _, image, error in images if error is None]
        results = iter(self.model.predict(good, method=method, save=False, return_candidates=True,
                                          progress=False, **kwargs) if good else [])
        rows = []
        for name, image, error in images:
            if error is None:
                r = next(results)
                error = r["error"]
            row = {"name": name, "error": error}
            if error is None:
                timings = {"read": read_s / len(images), **r["timings"]}
                row.update(candidates=[{"text": c["text"], "score": float(c["score"]),
                                        **({"clip_score": c["clip_score"]} if "clip_score" in c else {})}
                                       for c in r["candidates"]],
                           timings=timings, thumbnail=_thumbnail(image))
            rows.append(row)
        return rows


def _gradio():
    """Gradio, with its analytics off for the whole process (set before its import, which may read it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


#: run at page load: remember the files the browser refuses to upload (over the size limit: Gradio shows a
#: passing notice and uploads nothing), so that the next request's results say what was refused
REFUSED_JS = """() => {
  const limit = %d;
  const note = (files) => {
    window.clipcapRefused = Array.from(files || []).filter((f) => f.size > limit)
      .map((f) => f.name + " (" + (f.size / 1048576).toFixed(1) + " MiB)");
  };
  const inside = (e) => e.target instanceof Element && e.target.closest("#images");
  document.addEventListener("change", (e) => { if (inside(e) && e.target.files) note(e.target.files); }, true);
  document.addEventListener("drop", (e) => { if (inside(e) && e.dataTransfer) note(e.dataTransfer.files); }, true);
}"""
#: run on the button before the request: the refused files' names go to the hidden ``refused`` input
SEND_REFUSED_JS = """(...args) => { args[%d] = (window.clipcapRefused || []).join("\\n"); return args; }"""


def _refused_rows(refused, max_file_bytes, limit):
    """Error rows for the files the browser refused (names it reports; at most ``limit``, each shortened)."""
    names = []
    for line in io.StringIO((refused or "")[:MAX_URL_TEXT]):  # one line at a time, up to ``limit`` names
        if len(names) >= limit:
            break
        if line.strip():
            names.append(line.strip()[:200])
    return [{"name": name, "error": f"not uploaded: larger than the {max_file_bytes // 2**20} MiB limit"}
            for name in names]


def _log_request(rows, method, seconds):
    logger.info("caption request: %d image(s), %s, %.2f s, %d error(s)", len(rows), method, seconds,
                sum(row["error"] is not None for row in rows))


def build_demo(model, allow_private_urls=False, **limits):
    """The Gradio Blocks app for ``model`` (compiled by a warm-up first); `launch` starts it.
    ``allow_private_urls``: let the URL box fetch loopback / private / link-local addresses (see `serve`).

    The ``/caption`` API takes (files, urls, method, one value per control of `demo_options`, refused): for
    the built-in methods (files, urls, method, beam_size, temperature, top_p, num_captions, max_length, rerank,
    refused; the last two optional), and returns (the results page as HTML, the results as data:
    ``{"results": [{"name", "error", "captions", "scores"[, "clip_scores"]}], "errors": N}``)."""
    gr = _gradio()

    captioner = Captioner(model, allow_private_urls=allow_private_urls, **limits)
    captioner.warm_up()

    names = list(demo_options())

    def run(files, urls, method, *values):  # values: the controls' (in `names`' order), then `refused`
        start = time.perf_counter()
        controls = dict(zip(names, values))
        refused = values[len(names)] if len(values) > len(names) else ""
        refused_rows = _refused_rows(refused, captioner.max_file_bytes, captioner.max_images)
        try:
            rows = refused_rows + captioner.caption([getattr(f, "name", f) for f in files or []], urls, method,
                                                    **controls)
        except ValueError as e:  # too many images, or decoding options the method refuses
            _log_request(refused_rows, method, time.perf_counter() - start)
            return (f'<div id="results"><p style="color:#c00">error: {html.escape(str(e))}</p></div>',
                    {"results": [], "errors": 1, "error": str(e)})
        seconds = time.perf_counter() - start
        _log_request(rows, method, seconds)
        if not rows:
            return '<div id="results"><p>drop or upload images, or paste image URLs</p></div>', _summary(rows)
        return _render(rows, seconds), _summary(rows)

    with gr.Blocks(title="ClipCap captioning", analytics_enabled=False) as demo:
        gr.Markdown(f"## ClipCap image captioning\n{html.escape(describe_model(model))}\n\n"
                    f"Up to {captioner.max_images} images per request, {captioner.max_file_bytes // 2**20} MiB "
                    f"and {captioner.max_pixels // 10**6} megapixels each, "
                    f"{captioner.max_request_pixels // 10**6} megapixels in all.", elem_id="header")
        gr.HTML(f"<style>{CSS}</style>")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="images", file_count="multiple", file_types=["image"], elem_id="images")
                urls = gr.Textbox(label="or image URLs (one per line)", lines=2, elem_id="urls")
                method = gr.Radio(list(SAMPLERS), value="greedy", label="decoding", elem_id="method")
                # one control per declared option, shown for the methods that use it (greedy: max tokens)
                controls = [_control(gr, option, "greedy" in methods) for option, methods in demo_options().values()]
                refused = gr.Textbox(value="", visible=False, label="files refused by the browser")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                output = gr.HTML('<div id="results"><p>results appear here</p></div>', elem_id="output")
                with gr.Accordion("results as data (also what the API returns)", open=False):
                    data = gr.JSON(elem_id="results-json")
        method.change(_visibility, method, controls, api_visibility="private")
        inputs = [files, urls, method, *controls, refused]
        button.click(run, inputs, [output, data], api_name="caption", js=SEND_REFUSED_JS % (len(inputs) - 1))
        demo.load(None, js=REFUSED_JS % captioner.max_file_bytes)
    return demo


def serve(model, host="127.0.0.1", port=7860, allow_private_urls=False, **limits):
    """Build the demo, queue requests one at a time, and serve until interrupted (one INFO log line per
    request: images, method, seconds, errors).

    ``allow_private_urls=True`` lets visitors' URLs reach loopback, private, link-local and other non-public
    addresses, i.e. whatever this machine reaches (its own services, the local network, a cloud's metadata
    service): only for a demo whose every visitor is trusted."""
    demo = build_demo(model, allow_private_urls=allow_private_urls, **limits)
    demo.queue(default_concurrency_limit=1, max_size=64)
    if logger.level == logging.NOTSET:  # the request lines show at the CLI's default (WARNING) level
        logger.setLevel(logging.INFO)
    demo.launch(server_name=host, server_port=port, max_file_size=limits.get("max_file_bytes", MAX_FILE_BYTES),
                show_error=True, quiet=True, prevent_thread_lock=True)
    print(f"serving {model.name} on http://{host}:{demo.server_port}/ (Ctrl-C to stop)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
