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
import os
import re
import unicodedata

import tiktoken

from chat_template import ChatTemplate
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
        # checkpoint templates are untrusted input: sandboxed and bounded (chat_template.py)
        self._template = ChatTemplate(self.chat_template, self.template_source)

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
        """The chat template applied to messages, as text; any error of the template is one BadValue naming the
        template's file and line (chat_template.py)."""
        return self._template.render(messages, add_generation_prompt, self.bos_token or "", self.eos_token or "")

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
