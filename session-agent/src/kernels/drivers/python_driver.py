# Session kernel driver for Python, run as `python3 -E -s -S -c <this>` inside the
# sandbox: no site hooks (.pth files of the host) run, sys.path is the standard
# library plus the workspace.
# Protocol (see kernels/mod.rs): one JSON request per line on stdin; user output
# goes to fds 1 and 2 as it is produced; when a request ends, the driver writes
# MARK on stderr, then MARK + JSON status on stdout. MARK = "\x1e\x1eSA:<nonce>:".
# Start-up time is session-creation time, and under gVisor every file the
# interpreter opens and every page it touches is paid for by the Sentry: the
# driver imports only built-in modules (`_ast`, `_signal`) and the C half of
# `json`, not `ast`, `json`, `signal` or `types`, which pull in `re`, `enum`,
# `functools` and `collections` (about 50 ms of CPU per sandbox, measured in
# architecture/session-agent.md). asyncio is imported only when a step awaits,
# traceback and linecache only when a step fails.
import _ast, _signal, os, sys

# Buffered: readline() then costs one read(2), not one per byte (a syscall
# costs ~20 us under gVisor). Nothing else reads this descriptor.
_proto_in = os.fdopen(os.dup(0), "rb")
# Packages the data plane installed, mounted read-only (never fetched here).
if os.environ.get("SANDBOX_PACKAGES"):
    sys.path.insert(1, os.environ["SANDBOX_PACKAGES"])
_devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(_devnull, 0)
os.close(_devnull)
sys.stdin = open(os.devnull)
_out = os.dup(1)
_err = os.dup(2)
os.set_inheritable(_out, False)
os.set_inheritable(_err, False)
sys.stdout.reconfigure(line_buffering=True)
sys.stderr.reconfigure(line_buffering=True)


def _json_codec():
    """(loads, dumps) over the C accelerator `_json`, which `json` itself
    uses; falls back to `json` when this interpreter's `_json` differs."""

    def not_serializable(o):
        raise TypeError("Object of type %s is not JSON serializable" % type(o).__name__)

    try:
        import _json

        ctx = type(sys)("_json_context")
        ctx.strict = True
        ctx.object_hook = None
        ctx.object_pairs_hook = None
        ctx.parse_float = float
        ctx.parse_int = int
        ctx.parse_constant = float  # NaN, Infinity, -Infinity
        scan = _json.make_scanner(ctx)
        ascii_str = _json.encode_basestring_ascii

        def loads(line):
            text = line.decode("utf-8").strip(" \t\r\n")
            value, end = scan(text, 0)
            if end != len(text):
                raise ValueError("extra data after the JSON value")
            return value

        def dumps(value, allow_nan=True):
            encode = _json.make_encoder(
                {}, not_serializable, ascii_str, None, ":", ",", False, False, allow_nan
            )
            return "".join(encode(value, 0))

        probe = {"a": [1, -2.5, "\u00e9\n", None, True, {}], "b": ""}
        if loads(dumps(probe).encode()) != probe:
            raise ValueError("_json round trip differs")
        return loads, dumps
    except Exception:
        import json

        return json.loads, lambda value, allow_nan=True: json.dumps(
            value, ensure_ascii=True, allow_nan=allow_nan, separators=(",", ":")
        )


_json_loads, _json_dumps = _json_codec()


async def _probe():
    pass


_coroutine = _probe()
_CoroutineType = type(_coroutine)
_coroutine.close()
del _coroutine, _probe

_state = {"running": False, "n": 0}
_sources = {}  # step filename -> source, for tracebacks
# User code gets a fresh __main__; the driver keeps its own globals.
_main = type(sys)("__main__")
_main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = _main
_ns = _main.__dict__
_loop = None


def _on_sigint(signum, frame):
    if _state["running"]:
        raise KeyboardInterrupt("interrupted")


_signal.signal(_signal.SIGINT, _on_sigint)


def _write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _finish(nonce, payload):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    mark = ("\x1e\x1eSA:%s:" % nonce).encode()
    _write_all(_err, mark + b"\n")
    _write_all(_out, mark + _json_dumps(payload).encode() + b"\n")


def _traceback(exc):
    import linecache, traceback

    for name, code in _sources.items():
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != "<string>"]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _await(awaitable):
    global _loop
    if _loop is None:
        import asyncio

        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(awaitable)


def _run(code, mode, event):
    _state["n"] += 1
    filename = "<step-%d>" % _state["n"]
    _sources[filename] = code
    if len(_sources) > 1000:  # bound the memory held for tracebacks
        del _sources[next(iter(_sources))]
    flags = _ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
    last = None
    if mode == "eval" and tree.body and isinstance(tree.body[-1], _ast.Expr):
        last = _ast.Expression(tree.body.pop().value)
    result = eval(compile(tree, filename, "exec", flags=flags), _ns)
    if isinstance(result, _CoroutineType):
        _await(result)
    result = None
    if last is not None:
        result = eval(compile(last, filename, "eval", flags=flags), _ns)
        if isinstance(result, _CoroutineType):
            result = _await(result)
    if mode == "handler":
        handler = _ns.get("handler")
        if not callable(handler):
            raise NameError("handler mode needs a function named handler(event)")
        result = handler(event)
        if hasattr(result, "__await__"):
            result = _await(result)
        try:
            _json_dumps(result, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError("handler(event) must return a JSON value: %s" % e) from None
        return result
    if result is None:
        return None
    try:
        _json_dumps(result, allow_nan=False)
        return result
    except (TypeError, ValueError, RecursionError):
        return repr(result)


def _serve():
    while True:
        line = _proto_in.readline()
        if not line:
            os._exit(0)
        try:
            req = _json_loads(line)
            nonce = str(req["nonce"])
        except Exception:
            continue
        op = req.get("op")
        if op == "env":
            os.environ.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
            _finish(nonce, {"status": "ok"})
            continue
        payload = {"status": "ok", "result": None}
        try:
            _state["running"] = True
            try:
                payload["result"] = _run(req.get("code", ""), req.get("mode", "eval"), req.get("event"))
            finally:
                _state["running"] = False
        except BaseException as exc:  # the session survives any exception of the step
            _state["running"] = False
            message = str(exc)
            if not message and isinstance(exc, MemoryError):
                message = "cannot allocate memory: the sandbox's memory limit was reached"
            payload = {
                "status": "error",
                "error": {
                    "type": type(exc).__name__,
                    "message": message,
                    "traceback": _traceback(exc),
                },
            }
        try:
            _finish(nonce, payload)
        except KeyboardInterrupt:
            _finish(nonce, payload)


_serve()
