"""A deterministic, varied text corpus for tokenizer parity tests (and for training tiny test tokenizers)."""
import random

WORDS = ("the of and to in is was for that with as on by it he she they we you I at from his her an be this "
         "which or had not are but have one all were when there can been if more will would who so no time "
         "people water about into than them could other then its only now over new some these two may first "
         "model training reward answer question token learning policy gradient alignment data").split()
ACCENTED = "café naïve résumé façade jalapeño Zürich São Paulo Ærøskøbing crème brûlée Dvořák Łódź".split()
CJK = ["日本語のテキスト", "中文分词测试", "한국어 문장입니다", "東京タワー", "我爱自然语言处理", "ひらがなカタカナ"]
OTHER = ["مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Γειά σου Κόσμε", "नमस्ते दुनिया", "สวัสดีครับ",
         "Tiếng Việt có dấu", "İstanbul ıi", "ǅemal ǈubljana"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖💬", "✨🎉", "🧪"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "if x != None and y >= 3:\n\tprint(f'{x!r}')", "SELECT * FROM users WHERE id = 42;",
        "const re = /^[a-z]+$/i;", "<div class=\"row\">&nbsp;</div>", "#include <stdio.h>\r\nint main(){}",
        "x = {'a': [1, 2, 3], \"b\": None}", "    indented\n        more\n", "λx.x", "a->b::c // comment"]
# control-token text that must stay plain text in encode() and in message contents
SPECIAL = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>", "<s>", "[INST]", "[/INST]", "<unk>",
           "<|eot_id|>", "<SPECIAL_20>", "<|user|>", "[TOOL_CALLS]"]
# ascii whitespace runs, then unicode spaces and look-alikes (zero-width space and BOM are not whitespace)
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t", "\u00a0", "\u3000", "\u2009",
          "\u2028", "\x0b", "\x0c", "\u0085", "\u200b", "\ufeff"]
CONTRACT = ["don't", "I'm", "we'll", "they've", "she'd", "it's", "IT'S", "You'RE", "O'Neil", "'s", "''"]
# fixed edge cases; the control bytes and the plane-5 char are bytes SmolLM2's vocab lacks (HF drops them)
EDGE = ["", " ", "  leading", "trailing  ", "\r\n", "\n", "1234567890123456789012345", "3.14159", "1,000,000",
        "x1y22z333", "  12  ", "\x00\x01\x04\x06\x13\x14\x16\x1d\x7f", "e\u0301 and a\u0308", "ﬁ ligature ①²",
        "<|im_end|>", "hello<|im_end|>\n<|im_start|>assistant\n", "</s>", "[INST] hi [/INST]", "\t\n \r\n\t",
        "the end.\n\n\n", "!!!???...", "a" * 300, "ab " * 100, "9" * 64, "\U00050000 rare plane"]


def _fragment(rng: random.Random) -> str:
    # one piece of text of a random kind; strings are joined from several of these
    kind = rng.randrange(10)
    if kind == 0:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        return words.capitalize() + rng.choice(".!?,;:")
    if kind == 1:
        return rng.choice(CODE)
    if kind == 2:
        # digit runs of every length: split one by one (SmolLM2), by three (Llama-3) or whole (GPT-2)
        return str(rng.randint(0, 10 ** rng.randint(1, 15))) + rng.choice(["", "%", " km", ".5", "th"])
    if kind == 3:
        return rng.choice(ACCENTED + CJK + OTHER)
    if kind == 4:
        return rng.choice(EMOJI) * rng.randint(1, 3)
    if kind == 5:
        return rng.choice(SPACES) * rng.randint(1, 4)
    if kind == 6:
        return rng.choice(SPECIAL)
    if kind == 7:
        return rng.choice(CONTRACT)
    if kind == 8:  # punctuation soup, the regexes' trickiest territory
        return "".join(rng.choice("abcXYZ019 _-./\\'\"()[]{}<>|#@$\n\t") for _ in range(rng.randint(1, 20)))
    return rng.choice(WORDS).upper()


def corpus(n: int = 2400, seed: int = 0) -> list[str]:
    """n strings: the fixed edge cases first, then random mixes of fragments joined by assorted separators."""
    rng = random.Random(seed)
    out = list(EDGE)
    while len(out) < n:
        parts = [_fragment(rng) for _ in range(rng.randint(1, 6))]
        out.append("".join(p + rng.choice(["", " ", " ", "\n", "  ", ", "]) for p in parts))
    return out


def conversations(seed: int = 0, n: int = 40) -> list[list[dict]]:
    """Ordinary chats (no leading/trailing whitespace in contents): user/assistant turns, some with system."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS + ACCENTED) for _ in range(rng.randint(1, 15))).capitalize()

    chats = []
    for k in range(n):
        msgs = [{"role": "system", "content": text()}] if k % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            # contents end in digits and newlines too: seams the chat template must not change
            msgs.append({"role": "user", "content": text() + rng.choice(["?", " 42?", "\n\nAnd 7 more."])})
            msgs.append({"role": "assistant", "content": text() + rng.choice([".", " 3.5!", ":\n- a\n- b"])})
        chats.append(msgs)
    return chats
