"""The ``rnnlab`` command: list | train | eval | generate | serve | data | bench | convert | demo.

Exit status: 0 on success; 2 for a usage or input error, with one line on stderr that names the
flag or file and what was expected; 1 for an unexpected failure, with its traceback; 130 when
training was interrupted (after saving a checkpoint). Results go to stdout; with ``--json`` the
human-readable lines go to stderr and stdout holds one JSON document.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .configs import Parser, float_in, int_at_least, name_flags, parse_device

__all__ = ["main", "entry", "build_parser"]


def _dir_arg(path: str, flag: str) -> Path:
    """``path`` as a directory to write: refused when it names an existing file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file; expected a directory (it is created if missing)")
    return p


@contextlib.contextmanager
def _as_flags(names):
    """Errors raised inside name the command-line flags of the config fields in ``names``."""
    try:
        yield
    except ValueError as e:
        raise ValueError(name_flags(str(e), names)) from None


# -- list -------------------------------------------------------------------------------------------
def cmd_list(a) -> list[dict]:
    from .models.registry import REGISTRY, build_mixer, get_spec, markdown_table, mixers, options_help
    if a.markdown:
        print(markdown_table(a.d_model))
        return []

    def build(name: str):  # on the meta device: sizes and options without allocating any weight
        with torch.device("meta"):
            return build_mixer(name, a.d_model)
    if a.mixer:
        spec = get_spec(a.mixer)
        layer = build(a.mixer)
        print(f"{spec.name} — {spec.paper}\n{spec.description}\n")
        print(f"options (in a layout: {spec.name}(option=value,...); in Python: build_mixer({spec.name!r}, d_model, option=value)):")
        for field_name, default, note in options_help(a.mixer):
            print(f"  {field_name + ' = ' + repr(default):34} {note}")
        size = f"{layer.state_size():,} bytes" if layer.recurrent else "grows with the tokens seen"
        print(f"\nstate per layer: {spec.state_size}; at d_model={a.d_model}: {size} (float32, batch 1)")
        return [{"mixer": spec.name, "paper": spec.paper, "state_bytes": layer.state_size() if layer.recurrent else None,
                 "options": {f: d for f, d, _ in options_help(a.mixer)}}]
    rows = []
    print(f"{'mixer':18} {'state bytes/layer':>18}  {'paper':34} description")
    for name in mixers():
        spec = REGISTRY[name]
        layer = build(name)
        size = f"{layer.state_size():,}" if layer.recurrent else f"{spec.state_size.split(' (')[0]}"
        print(f"{name:18} {size:>18}  {spec.paper[:34]:34} {spec.description}")
        rows.append({"mixer": name, "paper": spec.paper, "state_bytes": layer.state_size() if layer.recurrent else None})
    print(f"\nstate sizes at d_model={a.d_model}, float32, batch 1; formulas: rnnlab list --markdown")
    return rows


# -- train / eval / data ----------------------------------------------------------------------------
def cmd_train(a) -> dict:
    from dataclasses import asdict
    from .configs import flag_values
    from .models.lm import LM, LMConfig, atomic_write
    from .train import distributed as D
    from .train.checkpoint import latest_checkpoint, load_checkpoint, remove_stale_temp, run_exists
    from .train.run import MODEL_FIELDS, DataConfig, check_fits, make_sources, open_data, read_run, resolve
    from .train.trainer import TrainConfig, train
    out = _dir_arg(a.out, "--out")
    flags = {"model": {k: v for k, v in flag_values(a, LMConfig).items() if k in MODEL_FIELDS},
             "train": {k: v for k, v in flag_values(a, TrainConfig).items() if k not in ("out_dir", "resume")},
             "data": flag_values(a, DataConfig)}
    given_flags = [k for section in flags.values() for k in section]
    with _as_flags(given_flags):
        given = resolve(a.preset, a.config, flags)
    if a.resume:  # the run's own settings, with what was given on top (checked for the model and data)
        if latest_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue (start without --resume)")
        saved_model, _, ts = load_checkpoint(out)
        saved_data = read_run(out)["data"]
        for section, saved, want in (("model", saved_model.to_dict(), given.model), ("data", saved_data, given.data)):
            clash = {k: (saved[k], v) for k, v in want.items() if saved.get(k) != v}
            if clash:
                raise ValueError(f"--resume continues the run as it was; these {section} settings differ from it: " +
                                 ", ".join(f"{k} = {v[1]!r} (the run has {v[0]!r})" for k, v in clash.items()))
        model_fields = saved_model.to_dict()
        train_fields = {k: v for k, v in ts["train_config"].items() if k not in ("out_dir", "resume")}
        data_cfg = DataConfig(**saved_data)
    else:
        if run_exists(out):
            raise FileExistsError(f"--out {out} already holds a training run; add --resume to continue it, "
                                  "or choose another --out")
        with _as_flags(given_flags):
            model_fields, train_fields, data_cfg = dict(given.model), {}, DataConfig(**given.data)
            LMConfig(**model_fields)  # check the model settings before reading any data
    with _as_flags(given_flags):
        cfg = TrainConfig(**{**train_fields, **given.train, "out_dir": str(out), "resume": a.resume})
    device = parse_device(a.device)
    e = D.setup(a.device)
    created = e.is_main and not out.exists()  # a run that fails before its first step leaves nothing behind
    try:
        if e.is_main and out.is_dir():
            remove_stale_temp(out)
        train_data, val_data = open_data(data_cfg, out / "data", e.is_main, D.barrier, reuse=a.resume,
                                         progress=_progress(a))
        tok = train_data.tokenizer()
        if model_fields.get("vocab_size", train_data.vocab_size) != train_data.vocab_size:
            raise ValueError(f"the data's tokenizer has {train_data.vocab_size} tokens, the run's model {model_fields['vocab_size']}")
        model_fields["vocab_size"] = train_data.vocab_size
        model_cfg = LMConfig(**model_fields)
        check_fits(model_cfg, cfg, train_data, val_data, device)
        torch.manual_seed(data_cfg.seed)
        model = LM(model_cfg).to(e.device)
        if e.is_main:
            print(f"model: {model.config.layout} x{model.config.n_layers}, d_model={model.config.d_model}, "
                  f"{model.num_params():,} parameters, {e.world_size} process(es) on {e.device}")
            print(f"data: {len(train_data):,} training tokens, {len(val_data):,} validation tokens, tokenizer {tok.spec}")
            out.mkdir(parents=True, exist_ok=True)
            run = {"data": asdict(data_cfg), "seq_len": cfg.seq_len, "tokenizer": tok.spec}
            atomic_write(out / "run.json", lambda p: Path(p).write_text(json.dumps(run, indent=2) + "\n"))
            tok_file = getattr(tok, "file", None)
            if tok_file is not None and not (out / "tokenizer.json").exists():
                shutil.copyfile(tok_file, out / "tokenizer.json")
        batches, val = make_sources(train_data, val_data, cfg, data_cfg.seed, e.rank, e.world_size,
                                    data_cfg.eval_batches, boundaries=data_cfg.packing == "documents",
                                    bos_id=_bos_id(tok) if data_cfg.bos else None)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        D.cleanup(wait=False)
        raise
    try:
        res = train(model, batches, cfg, val_batches=val, progress=_progress(a))
    except BaseException:
        D.cleanup(wait=False)
        raise
    D.cleanup()
    if e.is_main:
        state = "interrupted; continue with --resume" if res["interrupted"] else "done"
        print(f"{state}: step {res['step']}, checkpoint {res['checkpoint']}; metrics in {out}/metrics.jsonl, "
              f"curve in {out}/loss.png")
    if res["interrupted"]:
        raise SystemExit(130)  # saved, but not finished: scripts can tell
    return res


def _bos_id(tok) -> int:
    """The tokenizer's beginning-of-sequence id, for ``--bos`` (an error naming the flag if it has none)."""
    try:
        return int(tok.bos_id)
    except AttributeError:
        raise ValueError(f"--bos: the tokenizer {getattr(tok, 'spec', tok)!r} has no beginning-of-sequence token "
                         "(no bos_id)") from None
    except ValueError as e:
        raise ValueError(f"--bos: {e}") from None


def _progress(a) -> bool | None:
    """Progress bars: off with --quiet, on with --progress, else only on a terminal."""
    return False if a.quiet else True if a.progress else None


def cmd_eval(a) -> dict:
    import tempfile
    from . import load_model
    from .models.hf import load_tokenizer
    from .data.samplers import bos_windows
    from .train import loss_by_position, plot_loss_by_position
    from .train.run import DataConfig, open_data, read_run
    out = _dir_arg(a.out, "--out") if a.out else None
    device = parse_device(a.device)
    model = load_model(a.model, device=device).eval()
    model = _with_cache(model, a.cache)
    run = Path(a.model)
    recorded = read_run(run) if (run / "run.json").is_file() else {}
    if a.data is None and (run / "data" / "meta.json").is_file():
        data_cfg = DataConfig(data=[str(run / "data")])
    elif a.data is None and recorded:
        data_cfg = DataConfig(**{**recorded["data"], "max_bytes": a.max_bytes})
    else:
        tok = load_tokenizer(a.model)
        data_cfg = DataConfig(data=a.data or [], tokenizer=getattr(tok, "spec", "bytes"), max_bytes=a.max_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        _, val = open_data(data_cfg, tmp, progress=_progress(a))
        seq_len = a.seq_len or recorded.get("seq_len") or _trained_seq_len(run) or 256
        bos = a.bos if a.bos is not None else bool(recorded.get("data", {}).get("bos", False))
        bos_id = _bos_id(val.tokenizer()) if bos else None
        g = torch.Generator().manual_seed(a.seed)
        curves, rows, skipped = {}, [], []
        for mult in a.lengths:
            T = mult * seq_len
            if len(val) < T + 2:
                skipped.append(f"(skipping {mult}x = {T} tokens: the validation text has only {len(val):,} tokens)")
                continue
            starts = torch.randint(0, len(val) - T - 1, (a.windows,), generator=g)
            # read a batch of windows at a time: memory does not grow with --windows
            curve = sum(loss_by_position(model, bos_windows(val, part, T, bos_id), a.batch_size) * len(part)
                        for part in starts.split(a.batch_size)) / a.windows
            curves[T] = curve
            bits = curve / math.log(2)
            q = max(1, T // 8)
            rows.append({"length": T, "times_training": mult, "windows": a.windows, "bos": bos,
                         "bits": float(bits.mean()), "bits_first_eighth": float(bits[:q].mean()),
                         "bits_last_eighth": float(bits[-q:].mean())})
    if not rows:
        raise ValueError(f"--lengths: the validation text ({len(val):,} tokens) is shorter than every length asked "
                         f"for ({', '.join(str(m * seq_len) for m in a.lengths)} tokens); give more text with --data "
                         "or lower --seq-len")
    for note in skipped:
        print(note, file=sys.stderr)
    out = out or (run if run.is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'length':>8} {'x train':>8} {'bits/token':>11} {'first 1/8':>10} {'last 1/8':>10}")
    for r in rows:
        print(f"{r['length']:8d} {r['times_training']:7d}x {r['bits']:11.4f} {r['bits_first_eighth']:10.4f} "
              f"{r['bits_last_eighth']:10.4f}")
    from .bench import report
    plot_loss_by_position(curves, seq_len, out / "loss_by_position.png", title=f"{a.model}")
    print(f"(table: {out / 'eval.json'}, plot: {out / 'loss_by_position.png'})", file=sys.stderr)
    report("eval", rows, str(out / "eval.json"), model=str(a.model), train_seq_len=seq_len)
    return {"model": str(a.model), "train_seq_len": seq_len, "results": rows}


def _with_cache(model, cache: str | None):
    """``model`` with its attention layers under the ``--cache`` policy (None: as trained)."""
    if not cache:
        return model
    from .inference.cache import with_cache
    with _as_flags(["cache"]):
        return with_cache(model, cache)


def _trained_seq_len(run: Path) -> int | None:
    from .train.checkpoint import latest_checkpoint
    try:
        ck = latest_checkpoint(run)
    except Exception:
        return None
    if ck is None:
        return None
    return torch.load(ck / "trainer.pt", map_location="cpu", weights_only=True)["train_config"]["seq_len"]


def cmd_data(a) -> dict:
    from .data import prepare_corpus
    _dir_arg(a.out, "--out")
    meta = prepare_corpus(a.paths or None, a.out, tokenizer=a.tokenizer, shard_tokens=a.shard_tokens,
                          val_fraction=a.val_fraction, max_bytes=a.max_bytes or None,
                          progress=sys.stderr.isatty() if _progress(a) is None else _progress(a))
    for split, st in meta["splits"].items():
        print(f"{split:6} {st['tokens']:>14,} tokens {st['documents']:>8,} documents {len(st['shards']):>4} shard(s)")
    print(f"-> {a.out} (vocab {meta['vocab_size']}, {meta['dtype']}); train with: rnnlab train --data {a.out} --out RUN")
    return meta


# -- generate ---------------------------------------------------------------------------------------
def _decode_escapes(text: str) -> str:
    """Backslash escapes (\\n, \\t, \\u00e9 ...) decoded; other characters, non-ASCII included, kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _text_arg(text: str, flag: str, escapes: bool) -> str:
    """The text given with ``flag``, its backslash escapes decoded when ``escapes``; refused, naming
    ``flag``, when it is no valid text (a broken escape, or bytes that are not UTF-8)."""
    try:
        text = _decode_escapes(text) if escapes else text
        text.encode("utf-8")
    except UnicodeError as e:
        hint = "; with --escapes a backslash is written \\\\" if escapes else ""
        raise ValueError(f"{flag}: not valid text ({e.reason}){hint}") from None
    return text


def cmd_generate(a) -> str:
    from . import PrefixCache, Stream, load_model
    from .models.hf import load_tokenizer
    from .train.run import read_run
    if not a.prompt and not a.prefix and not a.state_in:
        raise ValueError("--prompt: give the text to continue (or --state-in FILE to continue a saved stream)")
    if a.prefix_cache and not a.prefix:
        raise ValueError("--prefix-cache stores the state after --prefix TEXT; give --prefix")
    if a.state_out:
        target = Path(a.state_out)
        if target.is_dir():
            raise ValueError(f"--state-out {a.state_out}: is a directory; expected a file name such as s.safetensors")
        if not target.parent.resolve().is_dir():
            raise ValueError(f"--state-out {a.state_out}: the directory {target.parent} does not exist")
    prefix = _text_arg(a.prefix, "--prefix", a.escapes)
    if a.read_twice and not prefix:
        raise ValueError("--read-twice repeats the context given with --prefix; give --prefix")
    if a.read_twice:  # JRT prompting: the context read twice, the question once
        prefix = prefix + "\n" + prefix
    prompt = _text_arg(a.prompt, "--prompt", a.escapes)
    device = parse_device(a.device)
    model = load_model(a.model, device=device).eval()
    model = _with_cache(model, a.cache).compile_step(a.compile)
    tok = load_tokenizer(a.model)
    run = Path(a.model)
    bos = a.bos if a.bos is not None else bool((read_run(run) if (run / "run.json").is_file() else {})
                                               .get("data", {}).get("bos", False))
    opening = torch.tensor([[_bos_id(tok)]]) if bos and not a.state_in else torch.zeros(1, 0, dtype=torch.long)
    if a.state_in:
        stream = Stream.load(model, a.state_in)
        if prefix:
            stream.feed(tok(prefix).to(device))
    elif prefix and a.prefix_cache:
        stream = PrefixCache(_dir_arg(a.prefix_cache, "--prefix-cache"), model).stream(
            torch.cat([opening, tok(prefix)], dim=1))
        print(f"[prefix of {int(stream.state.seen[0])} tokens {'loaded from' if stream.hit else 'stored in'} "
              f"{a.prefix_cache}]", file=sys.stderr)
    else:
        stream = Stream(model)
        if prefix or opening.numel():  # a new stream opens with BOS when the model was trained so
            stream.feed(torch.cat([opening, tok(prefix)], dim=1).to(device))
    if prompt:
        stream.feed(tok(prompt).to(device))
    g = torch.Generator(device=device).manual_seed(a.seed)
    text, pending = [], []
    for t in stream.sample(a.max_new_tokens, a.temperature, a.top_k, a.top_p, generator=g):
        pending.append(int(t[0]))
        piece = tok.decode(pending)
        if not piece.endswith("\ufffd"):  # print whole characters as they complete
            sys.stdout.write(piece)
            sys.stdout.flush()
            text.append(piece)
            pending = []
    if pending:
        text.append(tok.decode(pending))
        sys.stdout.write(text[-1])
    sys.stdout.write("\n")
    if a.state_out:
        stream.save(a.state_out, dtype=getattr(torch, a.state_dtype) if a.state_dtype else None)
        print(f"[state after {int(stream.state.seen[0])} tokens, {stream.state.nbytes:,} bytes -> {a.state_out}]",
              file=sys.stderr)
    return "".join(text)


# -- serve ----------------------------------------------------------------------------------------
def cmd_serve(a) -> dict:
    from .configs import flag_values
    from .serve.config import ServeConfig
    try:
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn
    except ImportError as e:
        raise ValueError(f"rnnlab serve needs the serve extra ({e.name} is missing): pip install 'rnnlab[serve]'") from None
    from .serve.app import create_app
    key = a.api_key or os.environ.get("RNNLAB_API_KEY") or None
    with _as_flags(["api_key", *flag_values(a, ServeConfig)]):
        cfg = ServeConfig(**{**flag_values(a, ServeConfig), "api_key": key})
    _dir_arg(cfg.sessions_dir, "--sessions-dir")
    if a.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"warning: serving on {a.host} without an API key: anyone who reaches it can use the model "
              "(set --api-key or RNNLAB_API_KEY)", file=sys.stderr)
    with _as_flags(["sessions_dir"]):
        app = create_app(a.model, cfg)
    print(f"serving {a.model} on http://{a.host}:{a.port} (sessions in {cfg.sessions_dir}"
          f"{', API key required' if key else ''})", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return {"model": str(a.model), "host": a.host, "port": a.port}


# -- bench / convert --------------------------------------------------------------------------------
BENCHES = {"ops": "kernels of every op family, reference vs fast forms", "hf": "rnnlab vs transformers on the same weights",
           "rnn": "LSTM/GRU: Newton solve vs the loop", "mixers": "every mixer: train step, prefill, decode",
           "speed": "models | layers | decode | efficiency | peers | ragged, side by side with attention",
           "stream": "a million tokens through one stream: tokens/s, state and memory",
           "serve": "a real server under concurrent clients: requests/s, tokens/s, latency; --crash: SIGKILL and restart",
           "tasks": "synthetic task sweeps: MQAR, state tracking, passkey, set disjointness and JRT, copying"}


def cmd_bench(a, rest: list[str]):
    import importlib
    mod = importlib.import_module(f"rnnlab.bench.{a.what}")
    return mod.main(rest)


def cmd_convert(a) -> dict:
    from . import load_model
    from .models.hf import from_hf, to_hf
    out = _dir_arg(a.out, "--out")
    if a.from_hf:
        try:
            model = from_hf(a.from_hf)
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"--from-hf {a.from_hf}: not a transformers checkpoint rnnlab reads ({e})") from None
        model.save_pretrained(out)
        print(f"converted {a.from_hf} -> {out} ({model.num_params():,} parameters, layout {model.config.layout})")
    else:
        to_hf(load_model(a.to_hf), out)
        print(f"exported {a.to_hf} -> {out} (loadable with transformers' AutoModelForCausalLM)")
    return {"out": str(out)}


# -- demo -------------------------------------------------------------------------------------------
def _demo_layout() -> str:
    from .models.registry import mixers
    return "gated_deltanet*3,swa(window=128)" if "gated_deltanet" in mixers() else "attention,swa(window=128)"


def cmd_demo(a) -> dict:
    import shutil
    from . import ByteTokenizer, Stream, load_model
    from .data import prepare_corpus
    from .models.lm import LMConfig
    root = _dir_arg(a.out, "--out")
    layout = a.layout or _demo_layout()
    with _as_flags(["layout"]):
        LMConfig(layout=layout, n_layers=4, d_model=128)  # a bad --layout fails before any work
    device = parse_device(a.device)
    print(f"== rnnlab demo: a recurrent hybrid ({layout!r}) and a Transformer of the same size, "
          f"{a.seconds:.0f} s of training each, then streaming with a saved and resumed state")
    for d in ("data", "hybrid", "transformer"):  # the demo's own directories: always a fresh start
        shutil.rmtree(root / d, ignore_errors=True)
    prepare_corpus(None, root / "data", max_bytes=20_000_000, progress=False)
    shown = ["--quiet"] if a.quiet else ["--progress"] if a.progress else []
    common = ["--n-layers", "4", "--d-model", "128", "--seq-len", "256", "--batch-size", "16", "--lr", "3e-3",
              "--min-lr", "3e-3", "--warmup", "30", "--steps", "100000", "--eval-every", "0", "--save-every", "100000",
              "--max-seconds", str(a.seconds), "--data", str(root / "data")] + (["--device", a.device] if a.device else [])
    results = {}
    for name, lay in (("hybrid", layout), ("transformer", "attention")):
        print(f"== training {name}: layout {lay!r}")
        results[name] = main(["train", "--layout", lay, "--out", str(root / name)] + common + shown)
    print(f"\n{'model':12} {'layout':34} {'steps':>6} {'tokens/s':>9} {'MFU':>6} {'val bits/byte':>14}")
    for name, r in results.items():
        lay = layout if name == "hybrid" else "attention"
        print(f"{name:12} {lay:34} {r['step']:6d} {r['tokens_per_s']:9,.0f} {100 * r['mfu']:5.1f}% {r['val_bits']:14.3f}")
    dev = device
    model = load_model(root / "hybrid", device=dev).eval()
    tok = ByteTokenizer()
    prompt = "def read_config(path):\n    "
    stream = Stream(model)
    stream.feed(tok(prompt).to(dev))
    print(f"\n== streaming from the hybrid, one token at a time:\n{prompt}", end="")
    g = torch.Generator(device=dev).manual_seed(0)
    t0, n, sizes = time.time(), 0, []
    for t in stream.sample(160, temperature=0.8, top_k=40, generator=g):
        sys.stdout.write(tok.decode([int(t[0])]))
        sys.stdout.flush()
        n += 1
        if n % 40 == 0:
            sizes.append((int(stream.state.seen[0]), stream.state.nbytes))
    rate = n / (time.time() - t0)
    state_file = root / "hybrid" / "stream.safetensors"
    stream.save(state_file)
    print(f"\n== {rate:.0f} tokens/s; state saved to {state_file}")
    resumed = Stream.load(model, state_file)
    print("== reloaded from the file, continuing:\n", end="")
    for t in resumed.sample(80, temperature=0.8, top_k=40, generator=g):
        sys.stdout.write(tok.decode([int(t[0])]))
    sizes.append((int(resumed.state.seen[0]), resumed.state.nbytes))
    print("\n== state size while the context grows (bounded: recurrent layers + a 128-token window):")
    for seen, nbytes in sizes:
        print(f"   after {seen:4d} tokens: {nbytes:,} bytes")
    return results


# -- the parser -------------------------------------------------------------------------------------
def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _outputs(s: argparse.ArgumentParser, json_flag: bool = True, progress: bool = True) -> None:
    g = s.add_argument_group("output")
    if json_flag:
        g.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout "
                                                           "(the human-readable lines go to stderr)")
    if progress:
        g.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
        g.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal "
                                                               "(default: bars on a terminal, plain lines otherwise)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .configs import add_flags
    from .models.lm import LMConfig
    from .serve.config import ServeConfig
    from .train.run import MODEL_FIELDS, PRESETS, DataConfig
    from .train.trainer import TrainConfig
    p = Parser(prog="rnnlab", description="Recurrent sequence models: train, run, measure.",
               epilog=_examples("rnnlab list", "rnnlab train --layout 'gated_deltanet*3,swa(window=256)' --out runs/a",
                                "rnnlab generate --model runs/a --prompt 'def main():'",
                                "rnnlab COMMAND --help   (the options of one command)"))
    p.add_argument("--version", action="version", version=f"rnnlab {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")

    s = sub.add_parser("list", help="the registered mixers with papers and state sizes; one mixer's options",
                       description="The registered mixers, or one mixer's options.",
                       epilog=_examples("rnnlab list", "rnnlab list gated_deltanet --d-model 512", "rnnlab list --markdown"))
    s.add_argument("mixer", nargs="?", help="show this mixer's options with their defaults and meaning")
    s.add_argument("--d-model", type=int_at_least(1), default=256, help="model width for the state sizes shown (default: 256)")
    s.add_argument("--markdown", action="store_true", help="print the README's markdown table")
    _outputs(s, progress=False)

    s = sub.add_parser("train", help="train a language model on text (default: the standard library's source)",
                       description="Train a language model. Settings come from the dataclasses' defaults, then "
                                   "--preset, then --config FILE.toml ([model], [train], [data] tables), then flags. "
                                   "Under torchrun, every process runs this command (DDP or FSDP2). Losses are in "
                                   "bits per token (bits per byte with the byte tokenizer).",
                       epilog=_examples("rnnlab train --preset tiny --layout 'gated_deltanet*3,swa(window=256)' --out runs/a",
                                        "rnnlab train --data my_texts/ --steps 2000 --seed 1 --out runs/b",
                                        "rnnlab train --out runs/b --steps 4000 --resume",
                                        "torchrun --nproc-per-node 2 -m rnnlab train --preset small --out runs/c"))
    s.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, loss.png, run.json")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    s.add_argument("--config", help="a TOML file with [model], [train] and [data] tables (flags override it)")
    s.add_argument("--preset", choices=list(PRESETS), help="model and training sizes: " + "; ".join(
        f"{k}: " + ", ".join(f"{f}={v}" for sec in p.values() for f, v in sec.items()) for k, p in PRESETS.items()))
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    add_flags(s.add_argument_group("model (rnnlab.LMConfig)"), LMConfig,
              skip=tuple(f.name for f in dataclasses.fields(LMConfig) if f.name not in MODEL_FIELDS))
    add_flags(s.add_argument_group("training (rnnlab.train.TrainConfig)"), TrainConfig, skip=("out_dir", "resume"))
    add_flags(s.add_argument_group("data (rnnlab.train.run.DataConfig)"), DataConfig)
    _outputs(s)

    s = sub.add_parser("eval", help="bits per token of a saved model or run, and loss by position at 1x..8x its training length",
                       description="Bits per token on held-out text at multiples of the training length, and the "
                                   "loss against position (does the model extrapolate?). A run directory supplies "
                                   "its own data and training length.",
                       epilog=_examples("rnnlab eval --model runs/a", "rnnlab eval --model runs/a --lengths 1 4 16 --windows 32",
                                        "rnnlab eval --model saved_model/ --data held_out.txt --seq-len 512"))
    s.add_argument("--model", required=True, help="a run directory, a checkpoint or a saved model")
    s.add_argument("--data", nargs="+", help="text files/directories or a prepared directory (default: the run's "
                                             "own data, else the standard library's source)")
    s.add_argument("--max-bytes", type=int_at_least(0), default=DataConfig.max_bytes,
                   help=f"read at most this many bytes of text (default: {DataConfig.max_bytes:,})")
    s.add_argument("--seq-len", type=int_at_least(1), help="the training length T in tokens (default: the run's, else 256)")
    s.add_argument("--lengths", type=int_at_least(1), nargs="+", default=[1, 2, 4, 8],
                   help="evaluate at these multiples of T (default: 1 2 4 8)")
    s.add_argument("--windows", type=int_at_least(1), default=16, help="random validation windows per length (default: 16)")
    s.add_argument("--batch-size", type=int_at_least(1), default=4, help="windows per forward pass (default: 4)")
    s.add_argument("--seed", type=int_at_least(0), default=1234, help="seed of the window positions (default: 1234)")
    s.add_argument("--cache", help="evaluate the attention layers under a KV-cache policy: full, window=W or "
                                   "sinks=S,window=W (default: as trained)")
    s.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="open every evaluated stream with the tokenizer's beginning-of-sequence token "
                        "(default: as the run was trained, see `rnnlab train --bos`)")
    s.add_argument("--out", help="directory for eval.json and loss_by_position.png (default: the model directory)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    _outputs(s)

    s = sub.add_parser("data", help="data preparation: `rnnlab data prepare PATHS --out DIR`",
                       description="Data preparation.",
                       epilog=_examples("rnnlab data prepare my_texts/ --out data/mine",
                                        "rnnlab data prepare '*.md' --tokenizer tokenizer.json --out data/md"))
    dsub = s.add_subparsers(dest="data_cmd", required=True, metavar="prepare")
    d = dsub.add_parser("prepare", help="tokenise text into memory-mapped token shards (uint16/uint32) + meta.json",
                        description="Tokenise text files into memory-mapped token shards and meta.json; "
                                    "train on them with `rnnlab train --data DIR`.",
                        epilog=_examples("rnnlab data prepare my_texts/ --out data/mine",
                                         "rnnlab data prepare --max-bytes 5000000 --out data/stdlib"))
    d.add_argument("paths", nargs="*", help="files, directories or globs (default: the standard library's source); "
                                            "below a directory, hidden and binary files are left out")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json / directory holding one (default: bytes)")
    d.add_argument("--shard-tokens", type=int_at_least(1), default=100_000_000,
                   help="tokens per shard file (default: 100,000,000)")
    d.add_argument("--val-fraction", type=float_in(0, 1, hi_open=True), default=0.02,
                   help="share of files held out for validation, in [0, 1) (default: 0.02)")
    d.add_argument("--max-bytes", type=int_at_least(0), default=0,
                   help="read at most this many bytes for training (0 = all; default: 0)")
    _outputs(d)

    s = sub.add_parser("generate", help="stream a continuation from a saved model, optionally from and to a state file",
                       description="Sample a continuation token by token, printing it as it comes. A stream's "
                                   "state can be saved (--state-out) and continued later (--state-in).",
                                              epilog=_examples("rnnlab generate --model runs/a --prompt 'def main():'",
                                        "rnnlab generate --model runs/a --prompt 'x = ' --temperature 0 --state-out s.safetensors",
                                        "rnnlab generate --model runs/a --state-in s.safetensors --max-new-tokens 50",
                                        "rnnlab generate --model runs/a --prefix-cache cache/ --prefix \"$(cat doc.txt)\" "
                                        "--prompt 'Summary:'"))
    s.add_argument("--model", required=True, help="a run directory, a checkpoint or a saved model")
    s.add_argument("--prompt", default="", help="text to feed before sampling (needed unless --state-in is given)")
    s.add_argument("--escapes", action="store_true",
                   help="interpret backslash escapes such as \\n in --prompt and --prefix")
    s.add_argument("--max-new-tokens", type=int_at_least(0), default=200, help="tokens to sample (default: 200)")
    s.add_argument("--temperature", type=float_in(0), default=0.8, help="sampling temperature >= 0; 0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int_at_least(1), default=None, help="sample among the k most likely tokens (default: all)")
    s.add_argument("--top-p", type=float_in(0, 1, lo_open=True), default=None,
                   help="nucleus sampling: the smallest set of tokens with this much probability, in (0, 1] (default: off)")
    s.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the sampler (default: 0)")
    s.add_argument("--state-in", help="continue the stream saved in this state file")
    s.add_argument("--state-out", help="save the stream's state to this file afterwards (atomically)")
    s.add_argument("--state-dtype", choices=["float32", "bfloat16"], help="store the --state-out state in this "
                                                                        "dtype (default: as computed)")
    s.add_argument("--prefix", default="", help="text read before --prompt whose state --prefix-cache keeps "
                                                "(a system prompt, a document)")
    s.add_argument("--cache", help="KV-cache policy of the attention layers while streaming: full, window=W or "
                                   "sinks=S,window=W (StreamingLLM; default: as trained)")
    s.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="open a new stream with the tokenizer's beginning-of-sequence token (default: as the run "
                        "was trained, see `rnnlab train --bos`; never before a --state-in stream)")
    s.add_argument("--read-twice", action="store_true", help="JRT prompting: read the --prefix context twice "
                                                            "(joined by a newline) before --prompt")
    s.add_argument("--prefix-cache", help="directory of states after prefixes: the --prefix is read once, later "
                                          "runs with the same --prefix and model resume from its state")
    s.add_argument("--compile", action="store_true", help="decode through torch.compile (faster tokens after a "
                                                         "first one that compiles for seconds; default: eager)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    _outputs(s, progress=False)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server whose conversations are states saved on disk",
                       description="Serve a model over HTTP: /v1/completions and /v1/chat/completions "
                                   "(OpenAI-compatible, with streaming), and sessions (/v1/sessions) whose "
                                   "conversations are states written to --sessions-dir after every turn, so a "
                                   "turn reads only its new tokens and sessions survive restarts. Needs the "
                                   "serve extra: pip install 'rnnlab[serve]'.",
                       epilog=_examples("rnnlab serve --model runs/a",
                                        "rnnlab serve --model runs/a --port 8080 --sessions-dir /var/lib/rnnlab/sessions",
                                        "RNNLAB_API_KEY=secret rnnlab serve --model runs/a --host 0.0.0.0 --max-batch 16"))
    s.add_argument("--model", required=True, help="a run directory, a checkpoint or a saved model")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int_at_least(1), default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                     "(default: the RNNLAB_API_KEY environment variable, else none)")
    add_flags(s.add_argument_group("limits and sessions (rnnlab.serve.ServeConfig)"), ServeConfig, skip=("api_key",))

    s = sub.add_parser("bench", add_help=False, help="benchmarks: " + "; ".join(f"{k} ({v})" for k, v in BENCHES.items()),
                       description="Benchmarks; each prints a table and writes JSON (and PNG plots).",
                       epilog=_examples("rnnlab bench speed models --quick", "rnnlab bench ops --help"))
    s.add_argument("what", nargs="?", choices=list(BENCHES), metavar="{" + ",".join(BENCHES) + "}",
                   help="which benchmark; `rnnlab bench WHAT --help` shows its options")

    s = sub.add_parser("convert", help="convert Hugging Face checkpoints from/to rnnlab",
                       description="Convert checkpoints between transformers and rnnlab.",
                       epilog=_examples("rnnlab convert --from-hf path/to/mamba-130m --out models/mamba",
                                        "rnnlab convert --to-hf runs/a --out hf/a"))
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", help="a transformers checkpoint directory to read")
    g.add_argument("--to-hf", help="an rnnlab model directory to export")
    s.add_argument("--out", required=True, help="the directory to write")
    _outputs(s, progress=False)

    s = sub.add_parser("demo", help="train a recurrent hybrid and a Transformer for a minute each, compare, stream",
                       description="Train a recurrent hybrid and a Transformer of the same size for a fixed time "
                                   "each, compare them, then stream from the hybrid with its state saved and resumed.",
                       epilog=_examples("rnnlab demo", "rnnlab demo --seconds 20 --layout 'mamba2*3,swa(window=128)'"))
    s.add_argument("--seconds", type=float_in(0, lo_open=True), default=75.0,
                   help="training time per model in seconds (default: 75)")
    s.add_argument("--layout", default=None, help="the hybrid's layout (default: gated_deltanet*3,swa(window=128))")
    s.add_argument("--out", default="runs/demo", help="directory of the demo's runs (replaced; default: runs/demo)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    _outputs(s)
    return p


_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def main(argv: list[str] | None = None):
    """Run one ``rnnlab`` command; returns its result (a dict, list or str) for use from Python.
    Bad input raises SystemExit(2) after printing one line on stderr."""
    from .layers.state import StateError
    from .train.checkpoint import CheckpointError
    from .train.trainer import NonFiniteLossError
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        p.error(f"unrecognized argument {argv[0]}; expected a command first: "
                f"{', '.join(p._subparsers._group_actions[0].choices)}")
    a, rest = p.parse_known_args(argv)
    if a.cmd == "bench" and a.what is None:
        bench = p._subparsers._group_actions[0].choices["bench"]
        if rest and rest[0] in ("-h", "--help"):
            bench.print_help()
            raise SystemExit(0)
        bench.error("choose a benchmark: " + ", ".join(BENCHES))
    if rest and a.cmd != "bench":
        p._subparsers._group_actions[0].choices[a.cmd].error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"list": cmd_list, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "convert": cmd_convert, "demo": cmd_demo, "data": cmd_data, "serve": cmd_serve}
    if a.cmd in ("train", "eval", "bench", "demo"):  # long sequences: keep freed CPU memory for reuse
        from .allocator import reuse_freed_memory
        reuse_freed_memory()
    as_json = getattr(a, "json", False) is True
    name = f"rnnlab {a.cmd}" + (f" {a.data_cmd}" if a.cmd == "data" else f" {a.what}" if a.cmd == "bench" else "")
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            result = cmd_bench(a, rest) if a.cmd == "bench" else handlers[a.cmd](a)
    except BrokenPipeError:  # the reader of stdout went away (`rnnlab ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except (*_USER_ERRORS, StateError, CheckpointError, NonFiniteLossError) as e:
        # bad flags, values and files: one line that names them; anything else is a bug and keeps its traceback
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError, or the CPU allocator's plain RuntimeError; other RuntimeErrors are bugs
        if isinstance(e, RuntimeError) and not (isinstance(e, torch.OutOfMemoryError)
                                                or "can't allocate memory" in str(e)):
            raise
        print(f"{name}: error: out of memory ({' '.join(str(e).split())[:200]}); lower the sizes", file=sys.stderr)
        raise SystemExit(2) from None
    if as_json:
        print(json.dumps({"text": result} if isinstance(result, str) else result, default=str))
    return result


def entry() -> int:
    """The ``rnnlab`` console command: :func:`main` without its Python return value (exit status 0)."""
    try:
        main()
    except KeyboardInterrupt:
        print("\nrnnlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(entry())
