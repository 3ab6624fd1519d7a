"""
Chat templates are programs that come with a checkpoint: Jinja, run in a sandbox here, and bounded per
rendering in time and size, so that a template which loops for ever or builds a gigabyte string stops with one
line instead of hanging or filling the memory. tokenizer.py renders every conversation through ChatTemplate.
"""
import json
import re
import threading
import time
from datetime import datetime

from jinja2 import nodes
from jinja2.exceptions import TemplateSyntaxError
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

from errors import BadValue


class ChatTemplate:
    """A compiled chat template; source names it in errors (its file, or the built-in default)."""

    def __init__(self, text: str, source: str):
        self.source = source
        self._env = _BoundedSandbox()
        try:
            self._template = self._env.from_string(text)
        except TemplateSyntaxError as e:
            raise BadValue(f"{source}: chat template line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
        """The template applied to messages, as text. Any error of the template (raise_exception, the sandbox's
        SecurityError, a recursion, a bound passed) is one BadValue naming the template's file and line."""
        chars = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), str))
        budget = self._env.budget(TEMPLATE_SECONDS, max(TEMPLATE_CHARS, 4 * chars))
        out = []
        try:
            ctx = self._template.new_context(dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  bos_token=bos_token, eos_token=eos_token))
            try:
                for chunk in self._template.root_render_func(ctx):
                    budget.out += len(chunk)
                    if budget.out > budget.limit:
                        raise TemplateStop(f"wrote more than {budget.limit} characters (chat_template.TEMPLATE_CHARS)")
                    out.append(chunk)
            except Exception:
                self._env.handle_exception()  # re-raises, its traceback rewritten to the template's lines
        except Exception as e:  # the template is the user's program: whatever it raised is its error
            raise BadValue(f"{self.source}: chat template{_template_line(e)}: {_template_error(e)}") from None
        finally:
            self._env.end_budget()
        return "".join(out)


# ---------------------------------------------------------------------------------------------------------------
# the sandbox, and its bounds per rendering of one conversation.
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
                               "(chat_template.TEMPLATE_SECONDS)")


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
                                   f"{TEMPLATE_INT_BITS} (chat_template.TEMPLATE_INT_BITS)")
        elif _size(value) > b.limit:
            raise TemplateStop(f"built a value of {_size(value)} items, past the bound of {b.limit} "
                               "(chat_template.TEMPLATE_CHARS)")
        b.ticks += 1
        if not b.ticks & 63:
            b.check_time()
        return value

    def expect(self, size: int):
        """Refuse an operation before it runs when its result would be size items, past the bound."""
        b = self._local.budget
        if b is not None and size > b.limit:
            raise TemplateStop(f"would build a value of {size} items, past the bound of {b.limit} "
                               "(chat_template.TEMPLATE_CHARS)")

    def _check_args(self, args, kwargs):
        # widths, counts and paddings: a number larger than the bound as an argument asks for too much
        b = self._local.budget
        if b is None:
            return
        for a in (*args, *kwargs.values()):
            self.tick(a)
            if isinstance(a, int) and abs(a) > b.limit:
                raise TemplateStop(f"asked for {a} (a width or count), past the bound of {b.limit} "
                                   "(chat_template.TEMPLATE_CHARS)")

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
                               f"{TEMPLATE_INT_BITS} (chat_template.TEMPLATE_INT_BITS)")

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
                raise TemplateStop(f"ran more than {b.limit} loop iterations (chat_template.TEMPLATE_CHARS)")
            yield self.tick(item)

    def _parse(self, source, name, filename):
        """The template's syntax tree, with every for loop's iterable passed through _bounded_iter: a loop is the
        one construct that runs without any other hook (nested loops over a range, say)."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_bounded_iter", [], [], None, None, lineno=loop.iter.lineno)
        return tree


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
