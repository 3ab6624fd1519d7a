"""
Tokenizer for the checkpoints this repo trains, with exact parity to the reference implementations:
HF tokenizer.json byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen2) and Mistral tekken.json run on tiktoken,
sentencepiece tokenizer.model (Llama-2, Mistral-7B-v0.1) on sentencepiece. Configurations we cannot
reproduce exactly raise ValueError naming the unsupported piece.

encode() never produces control tokens ("<|im_end|>" in text is plain text); they come only from the chat
template. encode_chat() renders the template with a sentinel in place of each message content, splits on the
sentinels, and encodes scaffold pieces (control tokens allowed) and contents (plain text) separately, so a
content is tokenized as fresh text, as generation after a prompt also produces it. Byte-level regexes
already split at the seams of common templates ("\n" then text, control tokens), so for ordinary messages
the ids equal transformers' apply_chat_template(tokenize=True); they differ only where the regex would glue
a content's leading spaces to the scaffold's newline. With sentencepiece, text that starts the string or
follows a control token gets the "\u2581" prefix, text continuing a segment does not (HF legacy Llama).

The mask is 1 on the learned assistant contents and on the scaffold right after each, up to and including
the first end-of-turn token (eos_ids), so that the model learns to stop; never on role headers.

DEFAULT_CHAT_TEMPLATE, for checkpoints without one (base Mistral-7B-v0.1), is Zephyr's
"<s><|user|>\n...</s>\n<|assistant|>\n...</s>\n": Zephyr-7B-beta is Mistral-7B-v0.1 tuned with it on
UltraChat/UltraFeedback (the recipe the IFT paper follows), and it needs no new embeddings (role tags are
plain text, only bos/eos are control tokens).
"""
import base64
import json
import os
import re
import threading
import time
import unicodedata
from datetime import datetime

import tiktoken
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.exceptions import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

from errors import BadValue, NotFound, file_error, read_json, read_text

# HF ByteLevel(use_regex=True) split, i.e. GPT-2's
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Digits(individual_digits) then GPT-2's split, as one regex: a digit ends a segment, so whitespace before
# one counts as trailing (the lookahead), and no piece may start with a space before a digit
DIGITS_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
# end-of-turn control tokens that also stop generation when the chat template uses them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
# mistral-common's special tokens for tekken files that do not list them (ranks 0..19, then fillers)
TEKKEN_SPECIALS = ("<unk> <s> </s> [INST] [/INST] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] [TOOL_RESULTS] "
                   "[/TOOL_RESULTS] [TOOL_CALLS] [IMG] <pad> [IMG_BREAK] [IMG_END] [PREFIX] [MIDDLE] "
                   "[SUFFIX] [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [TOOL_CONTENT]").split()
TOKENIZER_FILES = ("tokenizer.json", "tekken.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")
_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use chars: no template or tokenizer touches them


def _byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(rest)}}


def _read_json(path: str) -> dict:
    return read_json(path)  # one UserError naming the file when it is missing, not UTF-8 or not JSON


# ---------------------------------------------------------------------------------------------------------------
# chat templates are untrusted programs: sandboxed, and each rendering bounded in time and size
#
# Bounds, per rendering of one conversation. Measured on this repo's real templates (SmolLM2-135M-Instruct's
# ChatML and the built-in Zephyr default; mistral-common ships no Jinja templates) over 1000 rows of
# data/chain_train.jsonl: 20-40 us per rendering, at most 529 characters out for 370 in; a 10-turn conversation of
# 35k characters renders in 0.15 ms to 50k characters (scaffold: ~40 characters per message). So:
# - TEMPLATE_SECONDS of CPU time (the rendering thread's own, so a loaded machine does not trip it): 5 s is over
#   10^4 times the slowest real rendering, and a runaway template is stopped within a few seconds;
# - TEMPLATE_CHARS: no string, list or output larger than max(4 Mi characters, 4 x the conversation's own
#   characters), and no more than that many loop iterations in all: real templates print each message once
#   plus a short scaffold (a 1M-token context is ~4M characters), so neither bound can refuse a real
#   conversation, while a template that builds a gigabyte string is stopped below 2 x the bound, before the
#   memory is spent (sizes are checked before the operations that could jump past it: *, +, **, %, replace,
#   join, widths given to format strings and filters).
TEMPLATE_SECONDS = 5.0
TEMPLATE_CHARS = 1 << 22
TEMPLATE_INT_BITS = 1 << 16  # integers: no real template computes with numbers of more than a few digits


class TemplateStop(Exception):
    """A template rendering that ran past a bound."""


class _Budget:
    __slots__ = ("seconds", "deadline", "limit", "steps", "out", "ticks")

    def __init__(self, seconds: float, limit: int):
        # the clock starts at the first time check (the 64th hook): reading a thread's CPU clock is a system
        # call, too slow to make for every rendering of a short conversation; 64 hooks are bounded work anyway
        self.seconds, self.deadline, self.limit, self.steps, self.out, self.ticks = seconds, None, limit, limit, 0, 0

    def check_time(self):
        now = time.thread_time()
        if self.deadline is None:
            self.deadline = now + self.seconds
        elif now > self.deadline:
            raise TemplateStop(f"was still running after {self.seconds:g} s of CPU time "
                               "(tokenizer.TEMPLATE_SECONDS)")


class _Current(threading.local):
    budget = None  # the budget of the rendering running in this thread, if any


_SIZED = (str, bytes, list, tuple, dict, set, frozenset)
_SIZED_TYPES = frozenset(_SIZED)
_PLAIN_TYPES = frozenset([type(None), bool, float])


def _size(value) -> int:
    t = type(value)
    if t in _SIZED_TYPES:
        return len(value)
    return 0 if t in _PLAIN_TYPES or not isinstance(value, _SIZED) else len(value)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no attribute escapes, no mutation of lists and dicts), plus a budget per
    rendering: every hook the sandbox has (attribute and item access, calls, the operators intercepted below),
    every filter and every for-loop iteration checks the time, and the sizes of the values they produce."""

    # * and ** can make a huge value from small ones in one step, % through a format width; + and ~ cannot (their
    # results are checked where they are read back, or written out), and not intercepting them keeps real
    # templates, which concatenate a lot, fast
    intercepted_binops = frozenset(["*", "**", "%"])

    def __init__(self):
        # HF's whitespace handling and helpers
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self._local = _Current()
        self.filters["tojson"] = lambda x, indent=None, sort_keys=False, **_: json.dumps(
            x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals.pop("lipsum", None)  # random text of any length: no chat template needs it
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["_bounded_iter"] = self._iterate

    # -- the budget
    def budget(self, seconds: float, limit: int) -> "_Budget":
        self._local.budget = _Budget(seconds, limit)
        return self._local.budget

    def end_budget(self):
        self._local.budget = None

    def tick(self, value=None):
        """Check value (a result, an argument) against the size bounds, and every 64th call the time."""
        b = self._local.budget
        if b is None:
            return value
        if type(value) is int:
            if value.bit_length() > TEMPLATE_INT_BITS:
                raise TemplateStop(f"computed an integer of {value.bit_length()} bits, past the bound of "
                                   f"{TEMPLATE_INT_BITS} (tokenizer.TEMPLATE_INT_BITS)")
        elif _size(value) > b.limit:
            raise TemplateStop(f"built a value of {_size(value)} items, past the bound of {b.limit} "
                               "(tokenizer.TEMPLATE_CHARS)")
        b.ticks += 1
        if not b.ticks & 63:
            b.check_time()
        return value

    def expect(self, size: int):
        """Refuse an operation before it runs when its result would be size items, past the bound."""
        b = self._local.budget
        if b is not None and size > b.limit:
            raise TemplateStop(f"would build a value of {size} items, past the bound of {b.limit} "
                               "(tokenizer.TEMPLATE_CHARS)")

    def _check_args(self, args, kwargs):
        # widths, counts and paddings: a number larger than the bound as an argument asks for too much
        b = self._local.budget
        if b is None:
            return
        for a in (*args, *kwargs.values()):
            self.tick(a)
            if isinstance(a, int) and abs(a) > b.limit:
                raise TemplateStop(f"asked for {a} (a width or count), past the bound of {b.limit} "
                                   "(tokenizer.TEMPLATE_CHARS)")

    def _check_format(self, fmt: str):
        # a width or precision inside a format string ("%9999999d", "{:>9999999}")
        for m in re.finditer(r"\d+", fmt):
            self.expect(int(m.group()) if len(m.group()) < 12 else 1 << 62)

    def _predict(self, name: str, obj, args):
        """Refuse str method name on obj (the sep for join) with args before it runs, when its result would pass
        the bound: the methods whose result can grow without a width argument."""
        if not isinstance(obj, str):
            return
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            count = obj.count(args[0]) if args[0] else len(obj) + 1
            self.expect(len(obj) + count * (len(args[1]) - len(args[0])))
        elif name == "join" and args:
            items = args[0] if isinstance(args[0], (list, tuple, str)) else ()
            self.expect(sum(len(x) if isinstance(x, str) else 32 for x in items) + len(obj) * len(items))
        elif name == "expandtabs":
            width = args[0] if args and isinstance(args[0], int) else 8
            self.expect(len(obj) + obj.count("\t") * max(width, 0))
        elif name in ("format", "format_map"):
            self._check_format(obj)

    # -- the sandbox's hooks
    # attribute and item access: the common case (a string or flag under the bound's floor) returns at once;
    # time is checked where the work is (loops, calls), not here
    def getattr(self, obj, attribute):
        value = super().getattr(obj, attribute)
        t = type(value)
        return value if t in _PLAIN_TYPES or (t in _SIZED_TYPES and len(value) <= TEMPLATE_CHARS) else \
            self.tick(value)

    def getitem(self, obj, argument):
        value = super().getitem(obj, argument)
        t = type(value)
        return value if t in _PLAIN_TYPES or (t in _SIZED_TYPES and len(value) <= TEMPLATE_CHARS) else \
            self.tick(value)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        __self.tick()
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive for loop: a loop too
            args = (__self._iterate(args[0]), *args[1:])
        if getattr(__obj, "__name__", None) != "safe_range":  # range is bounded by the sandbox (MAX_RANGE)
            __self._check_args(args, kwargs)
        # a str method, or str.format as the sandbox wraps it (the bound method is then __wrapped__)
        owner = getattr(__obj, "__self__", None) or getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        __self._predict(getattr(__obj, "__name__", ""), owner, args)
        return __self.tick(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and _size(seq):
                self.expect(_size(seq) * max(n, 0))
            elif isinstance(left, int) and isinstance(right, int):
                self.expect_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            self.expect_bits(right * left.bit_length())
        elif operator == "%" and isinstance(left, str):
            self._check_format(left)
            self._check_args(right if isinstance(right, tuple) else (right,), {})
        return self.tick(super().call_binop(context, operator, left, right))

    def expect_bits(self, bits: int):
        if self._local.budget is not None and bits > TEMPLATE_INT_BITS:
            raise TemplateStop(f"would compute an integer of about {bits} bits, past the bound of "
                               f"{TEMPLATE_INT_BITS} (tokenizer.TEMPLATE_INT_BITS)")

    def _bounded_filter(self, name, f):
        """Filter f, checked like a call. Marked pass_context (given the context, as jinja then does): jinja never
        runs such a filter on constants while compiling, outside any budget ({{ 'x' | center(10**10) }})."""
        wants = getattr(getattr(f, "jinja_pass_arg", None), "name", None)  # what jinja passed f first, if anything

        @pass_context
        def bounded(context, value, *rest, **kwargs):
            self.tick(value)
            self._check_args(rest, kwargs)
            if name == "replace":
                self._predict("replace", value, rest)
            elif name == "join" and isinstance(value, (list, tuple)):
                sep = rest[0] if rest else kwargs.get("d", "")
                self._predict("join", sep, [value])
            elif name == "format" and isinstance(value, str):
                self._check_format(value)
            elif name == "indent" and isinstance(value, str):
                width = rest[0] if rest else kwargs.get("width", 4)
                self.expect(len(value) + (len(width) if isinstance(width, str) else int(width))
                            * (value.count("\n") + 1))
            first = {"context": (context,), "eval_context": (context.eval_ctx,),
                     "environment": (context.environment,)}.get(wants, ())
            return self.tick(f(*first, value, *rest, **kwargs))

        bounded.__name__, bounded.__doc__ = getattr(f, "__name__", name), f.__doc__
        return bounded

    def _iterate(self, iterable):
        """Every for loop's iterable (see _parse): each iteration counts against the budget."""
        b = self._local.budget
        if b is None:
            yield from iterable
            return
        for item in iterable:
            b.steps -= 1
            if b.steps < 0:
                raise TemplateStop(f"ran more than {b.limit} loop iterations (tokenizer.TEMPLATE_CHARS)")
            yield self.tick(item)

    def _parse(self, source, name, filename):
        """The template's syntax tree, with every for loop's iterable passed through _bounded_iter: a loop is the
        one construct that runs without any other hook (nested loops over a range, say)."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_bounded_iter", [], [], None, None, lineno=loop.iter.lineno)
        return tree


class _Tiktoken:
    """Byte-level BPE on tiktoken: ranks give merge priority, rank_to_id maps them to the checkpoint's ids."""

    def __init__(self, pat: str, ranks: dict[bytes, int], rank_to_id, id_bytes: dict[int, bytes],
                 missing: bytes = b"", nfc: bool = False, text_added: dict[str, int] | None = None):
        self.enc = tiktoken.Encoding("ift", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
        self.pat, self.rank_to_id, self.id_bytes, self.nfc = pat, rank_to_id, id_bytes, nfc
        self.text_added = _literals(text_added or {})
        # bytes the vocab lacks: HF drops them from a piece before merging, so such text takes a slow path
        self.missing = re.compile(b"[" + re.escape(missing) + b"]") if missing else None

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        out: list[int] = []
        # non-special added tokens match inside text in HF too; they are split out first
        for piece, tid in _split(text, self.text_added):
            if tid is not None:
                out.append(tid)
                continue
            piece = unicodedata.normalize("NFC", piece) if self.nfc else piece
            if self.missing is not None and self.missing.search(piece.encode("utf-8", "surrogatepass")):
                import regex  # a tiktoken dependency, with the syntax of tiktoken's regex engine
                kept = [self.missing.sub(b"", m.group().encode()) for m in regex.finditer(self.pat, piece)]
                ranks = [r for p in kept if p for r in self.enc._encode_single_piece(p)]
            else:
                ranks = self.enc.encode_ordinary(piece)
            out += ranks if self.rank_to_id is None else [self.rank_to_id[r] for r in ranks]
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")


class _SentencePiece:
    """sentencepiece, plus a copy without the dummy-prefix space for text that continues a segment."""

    def __init__(self, path: str):
        import sentencepiece as spm
        try:
            with open(path, "rb") as f:
                proto = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
            # a second normalizer_spec (field 3) holding add_dummy_prefix=false (its field 3) is merged into
            # the first by the protobuf parser: that one flag changes
            self.sp_cont = spm.SentencePieceProcessor(model_proto=proto + b"\x1a\x02\x18\x00")
        except Exception as e:  # sentencepiece's RuntimeError on a file it cannot parse, or an OSError
            raise file_error(path, e, "not a sentencepiece model") from None
        n = self.sp.get_piece_size()
        self.controls = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        # like HF's legacy Llama tokenizers: a text segment that starts the string or follows a control token
        # gets the "▁" prefix; text continuing a segment (after a template's plain text) does not
        return (self.sp if at_start else self.sp_cont).encode(text)

    def decode(self, ids: list[int]) -> str:
        # sentencepiece drops control tokens: decode the runs between them and write them out as text
        out, run = "", []
        for i in [*ids, None]:
            if i is None or i in self.controls:
                out, run = out + self.sp.decode(run) + (self.sp.id_to_piece(i) if i is not None else ""), []
            else:
                run.append(i)
        return out


def _literals(tokens: dict[str, int]) -> tuple[re.Pattern | None, dict[str, int]]:
    """A regex matching any of the tokens (longest first, as HF matches added tokens), and the tokens."""
    body = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return (re.compile(body) if tokens else None), tokens


def _split(text: str, literals: tuple[re.Pattern | None, dict[str, int]]):
    """Yield (text, None) and (token, id) pieces of text, splitting on the literal tokens."""
    pat, tokens = literals
    if pat is None:
        yield text, None
        return
    start = 0
    for m in pat.finditer(text):
        yield text[start:m.start()], None
        yield m.group(), tokens[m.group()]
        start = m.end()
    yield text[start:], None


def _hf_pattern(pre: dict | None) -> str:
    """tiktoken pat_str equal to the HF pre_tokenizer, or ValueError."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    if kinds[-1] != "ByteLevel":
        raise BadValue(f"unsupported pre_tokenizer {kinds}: the last step must be ByteLevel")
    if steps[-1].get("add_prefix_space"):
        raise BadValue("unsupported pre_tokenizer: ByteLevel with add_prefix_space=true")
    use_regex = steps[-1].get("use_regex", True)
    if len(steps) == 1:
        return GPT2_PAT if use_regex else r"[\s\S]+"
    first = steps[0]
    if len(steps) == 2 and kinds[0] == "Digits" and use_regex:
        if not first.get("individual_digits"):
            raise BadValue("unsupported pre_tokenizer: Digits with individual_digits=false")
        return DIGITS_GPT2_PAT
    if len(steps) == 2 and kinds[0] == "Split" and not use_regex:
        if first.get("behavior") != "Isolated" or first.get("invert") or "Regex" not in first["pattern"]:
            raise BadValue(f"unsupported Split pre_tokenizer {first}: only Isolated, non-inverted Regex")
        r = first["pattern"]["Regex"]
        # Isolated keeps the text between matches as pieces; tiktoken drops it, so match such gaps too
        return f"(?:{r})|(?:(?!(?:{r}))[\\s\\S])+"
    raise BadValue(f"unsupported pre_tokenizer sequence {kinds}")


def _shape_errors(path: str, parse, *args):
    """parse(*args), where a file of the wrong shape (a string where an object belongs, a missing key) raises
    one BadValue naming the file instead of a KeyError or TypeError deep inside."""
    try:
        return parse(*args)
    except BadValue as e:
        raise e if str(e).startswith(path) else BadValue(f"{path}: {e}") from None
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise BadValue(f"{path}: not a tokenizer file of the expected shape ({type(e).__name__}: {e})") from None


def _parse_hf(path: str, cfg: dict) -> tuple[_Tiktoken, dict[str, int], dict[str, int], bool]:
    """tokenizer.json -> (backend, special tokens, vocab, whether HF's post-processor prepends a token)."""
    model, norm = cfg.get("model", {}), cfg.get("normalizer")
    if model.get("type") != "BPE":
        raise BadValue(f"{path}: unsupported model type {model.get('type')!r} (only byte-level BPE)")
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise BadValue(f"{path}: unsupported BPE option {key}={model[key]!r}")
    norms = norm["normalizers"] if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    if [n.get("type") for n in norms] not in ([], ["NFC"]):
        raise BadValue(f"{path}: unsupported normalizer {norm} (only none or NFC)")
    pat = _hf_pattern(cfg.get("pre_tokenizer"))
    specials, text_added = {}, {}
    for t in cfg.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise BadValue(f"{path}: unsupported lstrip/rstrip/single_word on added token {t['content']!r}")
        if not t.get("special") and t.get("normalized") and norms:
            raise BadValue(f"{path}: unsupported normalized non-special added token {t['content']!r}")
        (specials if t.get("special") else text_added)[t["content"]] = t["id"]
    added_ids = {**specials, **text_added}
    vocab: dict[str, int] = model["vocab"]
    chars = _byte_chars()
    id_bytes = {i: t.encode() for t, i in added_ids.items()}
    for tok, i in vocab.items():
        if i not in id_bytes:
            if any(c not in chars for c in tok):
                raise BadValue(f"{path}: vocab token {tok!r} is not byte-level")
            id_bytes[i] = bytes(chars[c] for c in tok)
    # HF merges in order: the i-th merge has priority i; tiktoken merges by the rank of the merged bytes, so
    # each token needs one priority. Converted tiktoken vocabs (Llama-3) list every split of a token as a run
    # of adjacent merges: one priority band, which is tiktoken's own rule (ties inside it go leftmost)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    made: dict[str, int] = {}
    last = None
    for i, (a, b) in enumerate(merges):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise BadValue(f"{path}: merge {a!r} {b!r} uses tokens missing from the vocab")
        if a + b in made and a + b != last:
            raise BadValue(f"{path}: merges {made[a + b]} and {i} both make {a + b!r}; no rank per token")
        made.setdefault(a + b, i)
        last = a + b
    byte_ids = {chars[c]: i for c, i in vocab.items() if len(c) == 1 and c in chars}
    # a multi-byte vocab token no merge makes is unreachable for HF; keep it out of tiktoken's ranks
    if model.get("ignore_merges") and any(len(t) > 1 and t not in made and t not in added_ids
                                          for t in vocab):
        raise BadValue(f"{path}: unsupported ignore_merges=true with tokens that no merge makes")
    merge_ids = [vocab[t] for t in made]
    if all(x < y for x, y in zip(merge_ids, merge_ids[1:])):
        # ids already follow merge order (GPT-2, Llama-3, Qwen2, SmolLM2 do): use them as ranks
        ranks = {bytes([b]): i for b, i in byte_ids.items()} | {id_bytes[i]: i for i in merge_ids}
        rank_to_id = None
    else:
        ranks = {bytes([b]): b for b in byte_ids} | {id_bytes[i]: 256 + k for k, i in enumerate(merge_ids)}
        rank_to_id = byte_ids | {256 + k: i for k, i in enumerate(merge_ids)}
    missing = bytes(b for b in range(256) if b not in byte_ids)
    if missing and model.get("unk_token"):
        raise BadValue(f"{path}: unsupported unk_token with bytes missing from the vocab")
    backend = _Tiktoken(pat, ranks, rank_to_id, id_bytes, missing, bool(norms), text_added)
    # Llama-3 style: a TemplateProcessing post-processor that starts with a special token (the bos)
    post = cfg.get("post_processor") or {}
    steps = post.get("processors", [post])
    single = next((p["single"] for p in steps if p.get("type") == "TemplateProcessing"), [])
    return backend, added_ids, {**vocab, **added_ids}, bool(single) and "SpecialToken" in single[0]


def _load_tekken(path: str) -> tuple[_Tiktoken, dict[str, int], int]:
    """tekken.json -> (backend, special tokens, vocab size): specials hold ids 0..n-1, BPE ranks follow."""
    return _shape_errors(path, _parse_tekken, _read_json(path))


def _parse_tekken(cfg: dict) -> tuple[_Tiktoken, dict[str, int], int]:
    conf = cfg["config"]
    n_special, size = conf["default_num_special_tokens"], conf["default_vocab_size"]
    listed = cfg.get("special_tokens") or [dict(rank=i, token_str=s) for i, s in enumerate(TEKKEN_SPECIALS)]
    specials = {f"<SPECIAL_{i}>": i for i in range(n_special)}  # mistral-common's filler names
    for t in listed:
        specials.pop(f"<SPECIAL_{t['rank']}>")
        specials[t["token_str"]] = t["rank"]
    vocab = cfg["vocab"][: size - n_special]  # mistral-common cuts the BPE vocab to the model's size
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in vocab}
    id_bytes = {i: s.encode() for s, i in specials.items()} | {r + n_special: b for b, r in ranks.items()}
    rank_to_id = list(range(n_special, n_special + len(ranks)))
    missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
    return _Tiktoken(conf["pattern"], ranks, rank_to_id, id_bytes, missing), specials, size


class Tokenizer:
    """Text <-> ids for one checkpoint directory, plus chat rendering with a training mask."""

    def __init__(self, backend, specials: dict[str, int], vocab: dict[str, int], vocab_size: int,
                 bos: str | None, eos: str | None, template: str | None, extra_eos: list[int],
                 files: list[str], add_bos: bool = False, template_source: str | None = None):
        self._backend, self.vocab_size = backend, vocab_size
        self._control_ids, self._special_re = set(specials.values()), _literals(specials)
        self.bos_token, self.eos_token, self.files = bos, eos, files
        self.bos_id, self.eos_id = vocab.get(bos), vocab.get(eos)
        # whether a raw prompt (no chat template) starts with bos, as HF's encode(add_special_tokens) does
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = template or DEFAULT_CHAT_TEMPLATE
        # where the template came from, for error messages
        self.template_source = (template_source or "the chat template") if template else \
            "the built-in default chat template (tokenizer.DEFAULT_CHAT_TEMPLATE)"
        eot = [vocab[t] for t in END_OF_TURN if t in specials and t in self.chat_template]
        self.eos_ids = list(dict.fromkeys([i for i in [self.eos_id, *extra_eos, *eot] if i is not None]))
        # checkpoint templates are untrusted input: sandboxed and bounded (_BoundedSandbox)
        self._env = _BoundedSandbox()
        try:
            self._template = self._env.from_string(self.chat_template)
        except TemplateSyntaxError as e:
            raise BadValue(f"{self.template_source}: chat template line {e.lineno}: {e.message}") from None

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load from a checkpoint directory holding tokenizer.json, tekken.json or tokenizer.model."""
        if not os.path.isdir(path):
            raise NotFound(f"tokenizer directory not found: {path!r}")
        files = [os.path.join(path, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
        found = {os.path.basename(f): f for f in files}
        conf_file = found.get("tokenizer_config.json")
        conf = _read_json(conf_file) if conf_file else {}
        # eos ids for generation: generation_config.json, else the model's config.json
        gen_file = next((f for f in (os.path.join(path, n) for n in ("generation_config.json", "config.json"))
                         if os.path.isfile(f)), None)
        gen = _read_json(gen_file) if gen_file else {}
        for key in ("bos_token_id", "eos_token_id"):
            ids = gen.get(key)
            if not (ids is None or _is_id(ids) or (key == "eos_token_id" and isinstance(ids, list)
                                                   and all(_is_id(i) for i in ids))):
                raise BadValue(f"{gen_file}: {key}={ids!r} must be a token id (a non-negative integer)"
                               f"{' or a list of them' if key == 'eos_token_id' else ''}")
        hf = None
        if "tokenizer.json" in found:
            tok_json = _read_json(found["tokenizer.json"])  # a file that is not JSON stops here, whatever else
            try:
                hf = _shape_errors(found["tokenizer.json"], _parse_hf, found["tokenizer.json"], tok_json)
            except ValueError:
                # Mistral-7B-v0.1 and Llama-2 ship a sentencepiece-style tokenizer.json (Metaspace, byte
                # fallback) beside the tokenizer.model it was converted from: use the original then
                if "tokenizer.model" not in found:
                    raise
        if hf is not None:
            backend, specials, vocab, add_bos = hf
            size = max(vocab.values()) + 1
            names = {i: t for t, i in vocab.items()}
            bos, eos = (names.get(gen.get(k)) if isinstance(gen.get(k), int) else None
                        for k in ("bos_token_id", "eos_token_id"))
        elif "tekken.json" in found:
            backend, specials, size = _load_tekken(found["tekken.json"])
            vocab, bos, eos, add_bos = specials, "<s>", "</s>", True
        elif "tokenizer.model" in found:
            backend = _SentencePiece(found["tokenizer.model"])
            sp, size = backend.sp, backend.sp.get_piece_size()
            specials = {sp.id_to_piece(i): i for i in backend.controls}
            vocab = {sp.id_to_piece(i): i for i in range(size)}
            bos, eos = (sp.id_to_piece(i) if i >= 0 else None for i in (sp.bos_id(), sp.eos_id()))
            add_bos = bos is not None  # Llama / Mistral prompts start with <s>
        else:
            raise NotFound(f"no tokenizer in {path!r}: expected tokenizer.json, tekken.json or tokenizer.model")
        bos, eos, add_bos = _shape_errors(conf_file or path, _read_config, conf, vocab, bos, eos, add_bos)
        template, source = _find_template(path, conf)
        extra = gen.get("eos_token_id")
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        return cls(backend, specials, vocab, size, bos, eos, template, extra, files, add_bos, source)

    def encode(self, text: str) -> list[int]:
        """Ids of text as plain text: no bos/eos added, control-token text is not matched."""
        return self._backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ids; control tokens are written out as their text."""
        return self._backend.decode(list(ids))

    def _encode_scaffold(self, text: str, ids: list[int]) -> list[int]:
        # template text: control tokens allowed; ids so far tell whether text starts a segment
        out: list[int] = []
        for piece, tid in _split(text, self._special_re):
            if tid is not None:
                out.append(tid)
            elif piece:
                out += self._backend.encode(piece, self._segment_start((out or ids or [None])[-1]))
        return out

    def _segment_start(self, last: int | None) -> bool:
        return last is None or last in self._control_ids

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to messages, as text. Any error of the template (raise_exception, the
        sandbox's SecurityError, a recursion, a bound of _BoundedSandbox passed) is one BadValue naming the
        template's file and line."""
        chars = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), str))
        budget = self._env.budget(TEMPLATE_SECONDS, max(TEMPLATE_CHARS, 4 * chars))
        out = []
        try:
            ctx = self._template.new_context(dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  bos_token=self.bos_token or "", eos_token=self.eos_token or ""))
            try:
                for chunk in self._template.root_render_func(ctx):
                    budget.out += len(chunk)
                    if budget.out > budget.limit:
                        raise TemplateStop(f"wrote more than {budget.limit} characters (tokenizer.TEMPLATE_CHARS)")
                    out.append(chunk)
            except Exception:
                self._env.handle_exception()  # re-raises, its traceback rewritten to the template's lines
        except Exception as e:  # the template is the user's program: whatever it raised is its error
            raise BadValue(f"{self.template_source}: chat template{_template_line(e)}: {_template_error(e)}") \
                from None
        finally:
            self._env.end_budget()
        return "".join(out)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    learn: str = "last") -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; mask is 1 on learned assistant answers and the end-of-turn token
        closing each (learn="last": the last assistant message only, "all": every assistant message)."""
        if learn not in ("last", "all"):
            raise ValueError(f"learn must be 'last' or 'all', not {learn!r}")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadValue(f"each message needs a string role and string content: {str(m)[:200]}")
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        learned = set(answers if learn == "all" else answers[-1:])
        full = self.render(messages, add_generation_prompt)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts = _SENTINEL.split(self.render(marked, add_generation_prompt))
        # the sentinel rendering must reproduce the real one; a template that trims contents is seen here
        for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
            if "".join(contents[int(p)] if k % 2 else p for k, p in enumerate(parts)) == full:
                break
        else:
            raise BadValue(f"{self.template_source}: the chat template alters message contents beyond "
                           "trimming; cannot mask them")
        ids, mask, closing = [], [], False
        for k, part in enumerate(parts):
            if k % 2:  # a message content: always plain text
                i = int(part)
                new = self._backend.encode(contents[i], self._segment_start((ids or [None])[-1]))
                closing = i in learned
                mask += [int(closing)] * len(new)
            else:  # template scaffold
                new = self._encode_scaffold(part, ids)
                mask += _closing_mask(new, self.eos_ids, self._control_ids) if closing else [0] * len(new)
                closing = False
            ids += new
        return ids, mask


def _closing_mask(new: list[int], eos_ids: list[int], controls: set[int]) -> list[int]:
    # after an answer, learn the scaffold up to the first end-of-turn token (the model must learn to stop),
    # unless another control token (say the next turn's header) comes before it
    for k, t in enumerate(new):
        if t in eos_ids:
            return [1] * (k + 1) + [0] * (len(new) - k - 1)
        if t in controls:
            break
    return [0] * len(new)


def _raise(message: str):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _template_line(e: BaseException) -> str:
    """' line N' of the template where e was raised (jinja rewrites tracebacks to template lines), or ''."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" line {line}" if line else ""


def _template_error(e: BaseException) -> str:
    from jinja2.exceptions import SecurityError, TemplateError
    if isinstance(e, RecursionError):
        return "recursion too deep (a macro or loop that calls itself without end?)"
    if isinstance(e, TemplateStop):
        return f"stopped: it {e}"
    if isinstance(e, SecurityError):
        return f"refused by the sandbox: {e}"
    if type(e) is TemplateError:  # raise_exception(...) in the template
        return f"raise_exception: {e}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_config(conf: dict, vocab: dict, bos, eos, add_bos):
    """(bos, eos, add_bos) after tokenizer_config.json's say; its keys of the wrong shape raise (see _shape_errors)."""
    # HF configs can add tokens on top of a tekken/sentencepiece vocab; we would not match them in text
    added = conf.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise BadValue(f"added_tokens_decoder must be an object {{id: token}}, not {type(added).__name__}")
    for i, t in added.items():
        if vocab.get(t["content"]) != int(i):
            raise BadValue(f"unsupported added token {t['content']!r} (id {i}) over the vocab")
    # tokenizer_config names special tokens as a string or as an AddedToken dict
    name = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
    for key in ("bos_token", "eos_token"):
        if not isinstance(name(conf.get(key)), (str, type(None))):
            raise BadValue(f"{key}={conf.get(key)!r} must be a token (a string)")
    if not isinstance(conf.get("add_bos_token", False), bool):
        raise BadValue(f"add_bos_token={conf['add_bos_token']!r} must be true or false")
    return name(conf.get("bos_token")) or bos, name(conf.get("eos_token")) or eos, conf.get("add_bos_token", add_bos)


def _find_template(path: str, conf: dict) -> tuple[str | None, str | None]:
    """(the checkpoint's chat template, the file it is in): chat_template.jinja, else tokenizer_config.json's
    (or None)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        return read_text(jinja), jinja
    source = os.path.join(path, "tokenizer_config.json")
    tpl = conf.get("chat_template")
    if isinstance(tpl, list):  # named templates: HF uses "default"
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tpl):
            raise BadValue(f"{source}: chat_template must be a string or a list of {{name, template}} objects")
        named = {t["name"]: t.get("template") for t in tpl}
        if "default" not in named:
            raise BadValue(f"{source}: chat templates {sorted(named)} have no 'default'")
        tpl = named["default"]
    if not isinstance(tpl, (str, type(None))):
        raise BadValue(f"{source}: chat_template must be a string (a Jinja template), not {type(tpl).__name__}")
    return tpl, source if tpl else None
