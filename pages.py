"""What a person opens in a browser: a page for every training run (OUT/index.html),
rewritten at each checkpoint while the run goes on, and the course's report gathered from
the runs of a folder (RUNS/report.html), the way TensorBoard or W&B show a run, without
them.

The HTML is written by hand, every text through html.escape and every link through
urllib's quote, with one small CSS block inline and nothing fetched: a page opens from
the file system in any browser, offline, and its folder can be zipped and sent (links
are relative). While a run trains its page asks the browser to reload it once a
checkpoint period (`<meta http-equiv="refresh">`); the page of a finished run has no such
line. The one script, a few lines of plain JavaScript, turns the strip of earlier sample
grids into a slider; without it the strip stays.

Pictures are drawn elsewhere (reports.py); a page only links the files that exist.
"""
import dataclasses
import html
import json
import shlex
import time
from pathlib import Path
from urllib.parse import quote

import metrics
import util

CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 0 1em 2em;
       max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
pre { background: #f4f4f4; padding: .6em; white-space: pre-wrap; overflow-wrap: break-word; }
pre.layers { white-space: pre; overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0; display: block; overflow-x: auto; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left;
         overflow-wrap: break-word; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.pictures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; overflow-wrap: break-word; }
.samples img { min-width: min(100%, 480px); image-rendering: pixelated; }
.strip { display: flex; gap: .5em; overflow-x: auto; }
.strip img { height: 120px; width: auto; }
.running { color: #a60; } .finished { color: #070; } .missing { color: #a00; }
"""

# a slider over the strip of earlier grids, when the browser runs scripts
SLIDER = """
document.querySelectorAll(".strip").forEach(function (strip) {
  var figures = strip.querySelectorAll("figure");
  if (figures.length < 2) return;
  var view = document.createElement("figure"), picture = document.createElement("img"),
      caption = document.createElement("figcaption"), slider = document.createElement("input");
  slider.type = "range"; slider.min = 0; slider.max = figures.length - 1;
  slider.value = figures.length - 1; slider.style.width = "100%";
  function show() {
    var chosen = figures[slider.value];
    picture.src = chosen.querySelector("img").src;
    caption.textContent = chosen.querySelector("figcaption").textContent;
  }
  slider.oninput = show; show();
  view.className = "samples"; view.append(picture, caption);
  strip.replaceWith(slider, view);
});
"""

# the pictures of a run folder (samples, t-SNE) in the order a reader wants them; the
# curves apart
PICTURES = ("samples.gif", "samples.png", "pairs.png", "grid.png",
                   "reverse_process.gif", "reverse_process.png", "reconstructions.png",
                   "interpolation.gif", "interpolation.png", "generated.png", "tsne.png",
                   "tsne_class.png", "tsne_domain.png")
CURVES = ("loss.png", "d_outputs.png", "mse.png", "kl.png", "accuracy.png", "fid.png",
          "kid.png", "digit_accuracy.png")
GRIDS = "grids"  # OUT/grids/step_000500.png: the sample grid of each checkpoint


def grid_path(out, step: int) -> Path:
    return Path(out) / GRIDS / f"step_{step:06d}.png"


# ============================================================================ pieces
def escape(value) -> str:
    return html.escape(str(value), quote=True)


def link(path: Path, folder: Path) -> str:
    """A path inside folder as a relative URL, escaped for an attribute."""
    return escape(quote(Path(path).relative_to(folder).as_posix()))


def document(title: str, body: str, refresh: int | None = None) -> str:
    reload = f'<meta http-equiv="refresh" content="{refresh}">\n' if refresh else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"{reload}<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n{body}\n<script>{SLIDER}</script>\n</body>\n</html>\n")


def number(value) -> str:
    """A figure as the page shows it: whole numbers whole, others to six digits."""
    if value is None:
        return "none"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def table(header: list, rows: list) -> str:
    """Every cell escaped; numbers (number()) right-aligned."""
    def cell(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f'<td class="number">{escape(number(value))}</td>'
        return f"<td>{escape(number(value))}</td>"
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def figure(path: Path, folder: Path, caption: str = "") -> str:
    url = link(path, folder)
    return (f'<figure><a href="{url}"><img src="{url}" alt="{escape(caption or path.name)}"'
            f' loading="lazy"></a><figcaption>{escape(caption or path.name)}</figcaption>'
            "</figure>")


def pictures(paths: list, folder: Path, kind: str = "") -> str:
    return (f'<div class="pictures {kind}">' + "".join(figure(p, folder) for p in paths)
            + "</div>\n")


# settings a command line always names, default or not: they name the run's folder
NAMED = ("variant", "kl_weight", "method", "src", "tgt")


def command_line(command: str, settings, seed: int) -> str:
    """`python run.py COMMAND --flag value ... --seed N`: the settings that name the run
    and those that differ from their defaults, as run.py's flags (a field `kl_weight` is
    --kl-weight; a bool is --flag or --no-flag); --resume is left out, the data and output
    folders too."""
    words = ["python", "run.py", command]
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name == "resume" or (value == field.default and field.name not in NAMED):
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(word) for word in words + ["--seed", str(seed)])


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# ============================================================================ run page
def run_page(run, results: dict | None = None) -> Path:
    """OUT/index.html of a training.Run: the command that repeats it, its progress, the
    last value of every curve, the pictures, the earlier sample grids, the settings; with
    `results` (the run has finished) the results table, and no reloading."""
    out, done = Path(run.out), min(run.step + 1, run.steps)
    seconds_per_step = run.seconds / max(done, 1)
    title = f"{run.desc}: {out.parent.name}/{out.name}"
    if results is None:
        refresh = min(max(round(seconds_per_step * run.every), 5), 600)
        status = (f'<p class="running">Running: step {done} of {run.steps} '
                  f"({100 * done / run.steps:.0f}%), {clock(run.seconds)} of training so "
                  f"far, about {clock(seconds_per_step * (run.steps - done))} more. This "
                  f"page reloads every {refresh} s.</p>")
    else:
        refresh = None
        status = (f'<p class="finished">Finished: {done} steps in {clock(run.seconds)} of '
                  "training. This page no longer reloads.</p>")
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    command = command_line(run.command, run.settings, run.seed)
    body = [f"<h1>{escape(title)}</h1>", status,
            f"<p>Written {written}. The command that repeats this run (with your "
            f"--data-root and --out):</p><pre>{escape(command)}</pre>"]
    if results is not None:
        body += ["<h2>Results</h2>", table(["result", "value"], result_rows(results))]
    body += ["<h2>Figures so far</h2>", table(["curve", "last value", "at step"],
                                              last_values(run.history))]
    shown = [out / name for name in PICTURES if (out / name).is_file()]
    curves = [out / name for name in CURVES if (out / name).is_file()]
    if shown:
        body += ["<h2>Pictures</h2>", pictures(shown, out, "samples")]
    grids = [(step, grid_path(out, step)) for step in run.history["step"]
             if grid_path(out, step).is_file()]
    if grids:
        body += ["<h2>Sample grids at every checkpoint</h2>", '<div class="strip">'
                 + "".join(figure(path, out, f"step {step}") for step, path in grids)
                 + "</div>"]
    if curves:
        body += ["<h2>Curves</h2>", pictures(curves, out)]
    body += ["<h2>Settings</h2>", table(["setting", "value"], [
        (name, value) for name, value in dataclasses.asdict(run.settings).items()])]
    return util.write_text(document(title, "\n".join(body), refresh), out / "index.html")


def result_rows(results: dict) -> list:
    """results.json's single values (its curves and settings are drawn or listed apart)."""
    return [(name, value) for name, value in sorted(results.items())
            if not isinstance(value, (dict, list)) and name != "command_line"]


def last_values(history: dict) -> list:
    """(name, last value, its step) of every curve in a training.Run's history: a series
    measured less often than at each checkpoint (FID) has its steps in NAME_step."""
    rows = []
    for name, values in history.items():
        if name == "step" or name.endswith("_step") or not values:
            continue
        steps = history.get(f"{name}_step", history["fid_step"] if name in
                            metrics.AT_FID_STEPS else history["step"])
        rows.append((name, values[-1], steps[len(values) - 1]
                     if len(values) <= len(steps) else ""))
    return rows


# ============================================================================ course report
def course_report(runs, architecture, methods: dict, scenarios) -> Path:
    """RUNS/report.html: the homework's parts in the course's order (GANs, VAE, DDPM,
    UDA), each filled from the runs under RUNS that exist, every figure captioned with
    the command that made it; a part without its run names the command that makes it.
    Reads results.json files and links pictures only: nothing trains or is measured.
    architecture(settings dict of a GAN run) -> its layer tables (text); methods: the
    UDA methods in the table's order with their titles; scenarios: (source, target)s."""
    runs = Path(runs)
    if not runs.is_dir():
        raise util.UserError(f"{runs} is not a folder: give the folder the runs wrote into "
                             "(their --out, default runs/)")
    report = Report(runs)
    parts = [("GANs", gan_part(report, architecture)), ("VAE", vae_part(report)),
             ("DDPM", ddpm_part(report)), ("Domain adaptation",
                                          uda_part(report, methods, scenarios))]
    body = [f"<h1>The course's results from {escape(runs.resolve().name)}/</h1>",
            f"<p>Gathered {time.strftime('%Y-%m-%d %H:%M:%S')} from the results.json files "
            "and pictures of the runs in this folder.</p>", run_pages(runs), "<ul>" + "".join(
                f'<li><a href="#{anchor(title)}">{escape(title)}</a></li>'
                for title, _ in parts) + "</ul>", *report.damaged.values()]
    body += [f'<h2 id="{anchor(title)}">{escape(title)}</h2>\n{text}'
             for title, text in parts]
    return util.write_text(document("Course report", "\n".join(body)), runs / "report.html")


def run_pages(runs: Path) -> str:
    """Links to the page of every run under RUNS."""
    links = [f'<a href="{link(path, runs)}">{escape(path.parent.relative_to(runs).as_posix())}'
             "</a>" for path in sorted(runs.rglob("index.html"))]
    return "<p>The page of each run: " + " &middot; ".join(links) + "</p>" if links else ""


def anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


class Report:
    """The run folders of RUNS and their results.json (a damaged one is named, not
    read), with the `--out` flag a missing run's command needs."""

    def __init__(self, runs: Path):
        self.runs, self.damaged = runs, {}  # path: the note that names it
        self.out_flag = "" if runs == Path("runs") else f" --out {shlex.quote(str(runs))}"

    def results(self, folder: Path) -> dict | None:
        path = folder / "results.json"
        if not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            results = None
        if not isinstance(results, dict):
            self.damaged[path] = (f'<p class="missing">{escape(path)} is damaged or not a '
                                  "run's results: run that training again.</p>")
            return None
        return results

    def found(self, pattern: str) -> list:
        """(folder, results) of the finished runs whose folders match pattern, in order."""
        found = [(folder, self.results(folder)) for folder in sorted(self.runs.glob(pattern))
                 if folder.is_dir()]
        return [(folder, results) for folder, results in found if results is not None]

    def missing(self, what: str, *commands: str) -> str:
        """What is missing and the command lines that make it (each with the --out it
        needs: self.out_flag for a command that writes into RUNS)."""
        lines = "\n".join(commands)
        return (f'<p class="missing">No {escape(what)} yet. Make it with:</p>'
                f"<pre>{escape(lines)}</pre>\n")

    def command(self, words: str) -> str:
        """`python run.py WORDS`, with --out RUNS when RUNS is not the default."""
        return f"python run.py {words}{self.out_flag}"

    def figure(self, folder: Path, name: str, results: dict, caption: str = "") -> str:
        """folder/name captioned with what it is and the command that made it, or the
        note that the run wrote no such picture."""
        path, made_by = folder / name, results.get("command_line", "(command not recorded)")
        if not path.is_file():
            return f'<p class="missing">{escape(path)} is missing: {escape(made_by)}</p>\n'
        label = f"{caption or name} ({folder.name}/{name}): {made_by}"
        return figure(path, self.runs, label)


GAN_COLUMNS = [("steps", "steps"), ("image size", "image_size"), ("FID", "fid"),
               ("best FID", "best_fid"), ("KID", "kid")]


def gan_part(report: Report, architecture) -> str:
    """The architecture tables and 32 samples of a and b; FID, KID and face rate of every
    variant in one table; ACGAN's pairs."""
    text = []
    for variant in ("a", "b"):
        folder = report.runs / f"gan_{variant}"
        results = report.results(folder)
        text.append(f"<h3>GAN {variant}</h3>")
        if results is None:
            text.append(report.missing(f"run of GAN {variant}",
                                       report.command(f"gan --variant {variant}")))
            continue
        settings = results.get("settings", {"variant": variant,
                                            "image_size": results.get("image_size", 64)})
        text += [f'<pre class="layers">{escape(architecture(settings))}</pre>',
                 report.figure(folder, "samples.png", results, "32 samples of fixed z")]
    variants = report.found("gan_*")
    text.append("<h3>FID, KID and face rate</h3>")
    if not variants:
        text.append(report.missing("GAN run", report.command("gan --variant a"),
                                   report.command("gan --variant b")))
    rates, rows, unmeasured = face_rates(report.runs), [], []
    for folder, results in variants:
        rate = next((entry["face_rate"] for images, entry in rates
                     if images.is_relative_to(folder.resolve())), None)
        rows.append([results.get("variant", folder.name)]
                    + [results.get(key, "") for _, key in GAN_COLUMNS]
                    + [rate if rate is not None else "not measured"])
        unmeasured += [folder] if rate is None else []
    if rows:
        text.append(table(["variant"] + [title for title, _ in GAN_COLUMNS] + ["face rate"],
                          rows))
    if unmeasured:  # the faces go into the run's folder, where the report finds them
        text.append(report.missing(
            "face rate of " + ", ".join(folder.name for folder in unmeasured),
            *[line for folder in unmeasured for line in (
                "python run.py gan --generate 1000 --ckpt "
                f"{shlex.quote(str(folder / 'checkpoint.pt'))} "
                f"--out {shlex.quote(str(folder / 'faces'))}",
                report.command(f"facerate --folder {shlex.quote(str(folder / 'faces'))}"))]))
    text.append("<h3>ACGAN: one z without and with the attribute</h3>")
    acgan = report.results(report.runs / "gan_acgan")
    text.append(report.figure(report.runs / "gan_acgan", "pairs.png", acgan) if acgan else
                report.missing("ACGAN run", report.command("gan --variant acgan")))
    return "\n".join(text)


def face_rates(runs: Path) -> list:
    """(resolved image folder, facerate results) of every `run.py facerate` under RUNS."""
    rates = []
    for path in sorted((runs / "facerate").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            rates.append((Path(entry["folder"]).resolve(), entry))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            continue
    return rates


VAE_COLUMNS = [("lambda", "kl_weight"), ("epochs", "epochs"), ("test MSE", "test_mse"),
               ("test KL", "test_kl"), ("MSE of 10 reconstructions", "reconstruction_mse_10_faces"),
               ("FID of samples", "fid"), ("FID of reconstructions", "reconstruction_fid")]


def vae_part(report: Report) -> str:
    """Learning curves, reconstructions and their MSE, samples and the latent t-SNE of
    the lambda = 1 run (or the first), and the lambda table of every run."""
    found = report.found("vae_lambda*")
    if not found:
        return report.missing("VAE run", report.command("vae --kl-weight 1"))
    folder, results = next(((f, r) for f, r in found if r.get("kl_weight") == 1), found[0])
    text = [f"<h3>lambda = {escape(number(results.get('kl_weight')))}</h3>",
            '<div class="pictures">'] + [report.figure(folder, name, results, caption)
                                          for name, caption in (
        ("mse.png", "learning curve, MSE"), ("kl.png", "learning curve, KL"),
        ("reconstructions.png", "test reconstructions, MSE "
         + number(results.get("reconstruction_mse_10_faces"))),
        ("samples.png", "samples"), ("tsne.png", "t-SNE of the latents"))] + ["</div>"]
    text += ["<h3>lambda table</h3>", table([title for title, _ in VAE_COLUMNS],
                                            [[r.get(key, "") for _, key in VAE_COLUMNS]
                                             for _, r in found])]
    if len(found) < 2:
        text.append(report.missing("second lambda", report.command("vae --kl-weight 0.1")))
    return "\n".join(text)


def ddpm_part(report: Report) -> str:
    """The 10x10 grid, the reverse process of a 0, digit accuracy and FID."""
    folder = report.runs / "ddpm"
    results = report.results(folder)
    if results is None:
        return report.missing("DDPM run", report.command("classifier --data mnistm"),
                              report.command("ddpm"))
    accuracy = results.get("digit_accuracy")
    return "\n".join([
        '<div class="pictures">', report.figure(folder, "grid.png", results, "10 x 10 grid"),
        report.figure(folder, "reverse_process.png", results, "reverse process of a 0"),
        report.figure(folder, "reverse_process.gif", results, "reverse process, animated"),
        "</div>",
        table(["steps", "sampler", "digit accuracy", "FID (curve's samples)",
               "FID of the 1000 digits"],
              [[results.get("steps", ""), results.get("sampler", ""),
                accuracy if accuracy is not None else
                results.get("digit_accuracy_unavailable", "none"),
                results.get("fid"), results.get("course_digits_fid", "none")]])])


def uda_part(report: Report, methods: dict, scenarios) -> str:
    """The table of every scenario and method present, and the t-SNE by digit and by
    domain of each method."""
    found = {(r.get("src"), r.get("tgt"), r.get("method")): (folder, r)
             for folder, r in report.found("uda/*/*")}
    if not found:
        return report.missing("domain adaptation run", report.command("uda --table"))
    present = [(s, t) for s, t in scenarios if any(k[:2] == (s, t) for k in found)]
    present += sorted({k[:2] for k in found} - set(present))  # scenarios of one's own
    rows = []
    for method, title in methods.items():
        cells = [found.get((s, t, method)) for s, t in present]
        if any(cells):
            rows.append([title] + [accuracy_cell(c[1]) if c else "not run" for c in cells])
    text = ["<h3>Accuracy on the target's test split</h3>",
            table(["method"] + [f"{s} -> {t}" for s, t in present], rows)]
    missing = [f"{s} -> {t}" for s, t in scenarios if (s, t) not in present]
    if missing:
        text.append(report.missing("run of " + ", ".join(missing),
                                   report.command("uda --table")))
    for (src, tgt) in present:
        text.append(f"<h3>t-SNE of the features, {escape(src)} -> {escape(tgt)}</h3>")
        for method, title in methods.items():
            if (src, tgt, method) in found:
                folder, results = found[(src, tgt, method)]
                text += [f"<h4>{escape(title)}</h4>", '<div class="pictures">',
                         report.figure(folder, "tsne_class.png", results, "by digit"),
                         report.figure(folder, "tsne_domain.png", results, "by domain"),
                         "</div>"]
    return "\n".join(text)


def accuracy_cell(results: dict) -> str:
    """As `run.py uda` prints it: accuracy (correct/total)."""
    if "target_accuracy" not in results:
        return "(unlabelled target)"
    return (f'{number(results["target_accuracy"])} '
            f'({results.get("correct", "?")}/{results.get("total", "?")})')
