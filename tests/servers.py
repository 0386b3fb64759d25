"""A FastAPI app run for real on 127.0.0.1 in a thread, for the server and dashboard tests."""
import contextlib
import threading
import time

import uvicorn


@contextlib.contextmanager
def running(app):
    """The app on 127.0.0.1 on an ephemeral port, in a thread; yields its base URL."""
    # log_config=None: uvicorn's own logging setup (logging.config.dictConfig) would close every handler
    # already installed, and absl's (rouge_score's) closes the stream it holds when that is no longer
    # sys.stderr: after an earlier test, pytest's capture file, which then fails the whole session
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
