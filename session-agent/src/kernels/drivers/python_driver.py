# Session kernel driver for Python, run as `python3 -E -s -S -c <this>` inside the
# sandbox: no site hooks (.pth files of the host) run, sys.path is the standard
# library plus the workspace.
# Protocol (see kernels/mod.rs): one JSON request per line on stdin; user output
# goes to fds 1 and 2 as it is produced; when a request ends, the driver writes
# MARK on stderr, then MARK + JSON status on stdout. MARK = "\x1e\x1eSA:<nonce>:".
# Start-up time is session-creation time: asyncio is imported only when a step
# awaits, traceback and linecache only when a step fails.
import ast, json, os, signal, sys, types

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

_state = {"running": False, "n": 0}
_sources = {}  # step filename -> source, for tracebacks
# User code gets a fresh __main__; the driver keeps its own globals.
_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = _main
_ns = _main.__dict__
_loop = None


def _on_sigint(signum, frame):
    if _state["running"]:
        raise KeyboardInterrupt("interrupted")


signal.signal(signal.SIGINT, _on_sigint)


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
    _write_all(_out, mark + json.dumps(payload, ensure_ascii=True).encode() + b"\n")


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
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = ast.parse(code, filename, "exec")
    last = None
    if mode == "eval" and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    result = eval(compile(tree, filename, "exec", flags=flags), _ns)
    if isinstance(result, types.CoroutineType):
        _await(result)
    result = None
    if last is not None:
        result = eval(compile(last, filename, "eval", flags=flags), _ns)
        if isinstance(result, types.CoroutineType):
            result = _await(result)
    if mode == "handler":
        handler = _ns.get("handler")
        if not callable(handler):
            raise NameError("handler mode needs a function named handler(event)")
        result = handler(event)
        if hasattr(result, "__await__"):
            result = _await(result)
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError("handler(event) must return a JSON value: %s" % e) from None
        return result
    if result is None:
        return None
    try:
        json.dumps(result, allow_nan=False)
        return result
    except (TypeError, ValueError, RecursionError):
        return repr(result)


def _serve():
    while True:
        line = _proto_in.readline()
        if not line:
            os._exit(0)
        try:
            req = json.loads(line)
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
