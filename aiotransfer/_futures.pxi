# The futures layer (included by _core.pyx): op ids -> asyncio futures.
#
# One reader on the worker's eventfd; each wake-up drains every record and
# resolves futures in a batch.  Once operations are posted, the event loop
# itself polls the NICs (a tick rescheduled with call_soon, for `poll_window`
# after the last activity): the worker stands back and no wake-up crosses
# threads, which on a busy host is most of an operation's cost.  After the
# window the worker and its eventfd take over again.  A receiver that only
# waits for immediates leaves the NICs to the worker (expect_imm polls
# briefly in `spin`, for answers that come within microseconds).  The hot path (write, write_imm) checks its
# arguments, posts and creates the future here, in C, without per-op Python
# frames.  Buffers: an operation holds its source CoreMR (and counts in its
# `inflight`) until the completion RECORD arrives, never until the future is
# cancelled.

from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_DelItem
from cpython.ref cimport PyObject

cdef uint64_t IMM_LIMIT = 1ULL << 32
cdef uint64_t SPIN_MAX_NS = 50000   # a tick blocks an idle loop at most this long


cdef class Dest:
    """A resolved destination region: its id in the C core, owner peer, size."""
    cdef readonly uint64_t id, peer, nbytes
    cdef readonly object region      # the RemoteRegion
    cdef readonly str peer_name

    def __init__(self, uint64_t id, uint64_t peer, uint64_t nbytes, region, str peer_name):
        self.id = id
        self.peer = peer
        self.nbytes = nbytes
        self.region = region
        self.peer_name = peer_name


cdef class PendingOp:
    cdef readonly object fut
    cdef readonly CoreMR src
    cdef readonly str name
    cdef readonly uint64_t nbytes
    cdef readonly str peer


cdef class PendingWait:
    cdef readonly object fut
    cdef readonly uint32_t imm
    cdef readonly uint64_t count


cdef object U64_END = 1 << 64


cdef object _check_uint(str name, object v, object limit):
    """An integer argument in [0, limit): TypeError/ValueError naming it.
    The one argument check of the package (engine.py uses it through arg_uint)."""
    cdef object i
    if type(v) is int:
        i = v
    elif isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, not bool")
    else:
        try:
            i = v.__index__()
        except (AttributeError, TypeError):   # no __index__, or one that refuses
            raise TypeError(f"{name} must be an integer, not {type(v).__name__}") from None
        if type(i) is not int:
            raise TypeError(f"{name} must be an integer, not {type(v).__name__}")
    if i < 0 or i >= limit:
        raise ValueError(f"{name}={i} is out of range [0, {limit})")
    return i


cdef inline int _timed_poll(atx_engine *e, uint64_t window, uint64_t *took) noexcept nogil:
    """atx_app_poll, and how long it took (ns) in *took."""
    cdef uint64_t t0 = atx_now_ns()
    cdef int r = atx_app_poll(e, window)
    took[0] = atx_now_ns() - t0
    return r


cdef inline uint64_t _arg_u64(str name, object v, uint64_t limit) except? 0xFFFFFFFFFFFFFFFF:
    """_check_uint as a C integer; limit 0 means 2**64.  A plain int in
    range converts in C; anything else (and every error) goes through
    _check_uint, which names the argument."""
    cdef unsigned long long x
    if type(v) is int:
        x = _long_as_ull(v)
        if x == <unsigned long long>-1 and PyErr_Occurred() != NULL:
            PyErr_Clear()   # negative or too large: the message comes below
        elif limit == 0 or x < limit:
            return x
    return <uint64_t>_check_uint(name, v, limit if limit else U64_END)


def arg_uint(str name, v, limit=U64_END):
    """Python entry of the argument check."""
    return _check_uint(name, v, limit)


cdef class Completions:
    """Turns the core's records into resolved futures for one event loop."""
    cdef readonly CoreEngine core
    cdef readonly object loop
    cdef readonly dict ops          # id -> PendingOp
    cdef readonly dict waiters      # id -> PendingWait
    cdef object create_future
    cdef object on_message          # callable(bytes)
    cdef object make_error          # callable(PendingOp, status, text, closing) -> exc
    cdef uint64_t next_id
    cdef int fd
    cdef bint closed
    cdef bint polling               # a poll tick is scheduled: the loop drives the NICs
    cdef readonly uint64_t poll_window   # ns the loop keeps polling after activity; 0: never
    cdef object call_soon, tick
    cdef object tick_handle         # the tick's reusable loop Handle (default loop), or None
    cdef object ready               # the loop's run queue (asyncio's deque; None: unknown)
    cdef uint64_t spin_max          # ns a tick may poll in C when the loop has nothing ready
    cdef readonly uint64_t ticks, poll_starts   # loop polls, and times polling began
    cdef readonly uint64_t ticks_nogil          # loop polls made without the GIL
    cdef bint poll_long             # the last loop poll took POLL_NOGIL_NS or more
    # the engine's resolution of a write's arguments: its MemoryRegion class,
    # its cache of destinations (shared dict), and its slow paths, which
    # resolve what the cache misses and raise the errors that name the argument
    cdef object mr_type
    cdef dict dests
    cdef object slow_src, slow_dest
    cdef object post_error          # callable(CoreError, op name, nbytes, peer) -> exception
    # the last destination the cache resolved, by identity: a stream of
    # writes to one region skips the dict lookup and RemoteRegion's hash (a
    # Python call).  Only cache hits land here (bytes and RemoteRegion,
    # immutable); a cached Dest stays valid for the engine's life.
    cdef object last_dst
    cdef Dest last_d
    # the default loop's futures are built directly (loop.create_future is
    # a Python frame that does only this); other loops keep their own
    cdef object future_type

    def __init__(self, CoreEngine core, loop, on_message, make_error, uint64_t poll_window=0):
        self.core = core
        self.loop = loop
        self.ops = {}
        self.waiters = {}
        self.create_future = loop.create_future
        self.future_type = None
        if getattr(type(loop), "create_future", None) is _asyncio_base.BaseEventLoop.create_future:
            self.future_type = _asyncio_Future
        self.call_soon = loop.call_soon
        self.tick = self._tick
        self.poll_window = poll_window
        self.spin_max = min(poll_window, SPIN_MAX_NS)
        self.ready = getattr(loop, "_ready", None)
        if self.ready is not None and not hasattr(self.ready, "__len__"):
            self.ready = None
        # On asyncio's own loop the tick goes straight into the run queue
        # as one Handle, made once: loop.call_soon is four Python frames
        # and a new Handle each time, a microsecond per loop iteration on
        # a stream's hot path.  (Debug mode and other loops: call_soon.)
        self.tick_handle = None
        if (self.ready is not None and isinstance(loop, _asyncio_base.BaseEventLoop)
                and type(loop).call_soon is _asyncio_base.BaseEventLoop.call_soon
                and not loop.get_debug()):
            self.tick_handle = _asyncio_Handle(self.tick, (), loop, None)
        self.on_message = on_message
        self.make_error = make_error
        self.next_id = 1
        self.fd = core.fileno()
        loop.add_reader(self.fd, self._on_readable)

    cpdef uint64_t new_id(self):
        cdef uint64_t i = self.next_id
        self.next_id = i + 1
        return i

    cdef inline bint _stopped(self):
        return self.closed or self.core.e == NULL or self.core.stopped

    cdef inline int _live(self) except -1:
        if self._stopped():
            raise CoreError(FI_ESHUTDOWN, "engine is stopped")
        return 0

    cdef object _track(self, uint64_t rid, CoreMR src, str name, uint64_t nbytes, str peer):
        cdef PendingOp op = PendingOp.__new__(PendingOp)
        if self.future_type is not None:
            # (Future() without loop=, which finds the running loop itself,
            # measured 12-15% slower on shm 8 B writes)
            fut = self.future_type(loop=self.loop)
        else:
            fut = self.create_future()
        op.fut = fut
        op.src = src
        op.name = name
        op.nbytes = nbytes
        op.peer = peer
        self.ops[rid] = op
        if src is not None:
            src.inflight += 1
        if not self.polling:
            self._start_polling()
        return fut

    def track(self, uint64_t rid, CoreMR src, str name, uint64_t nbytes, str peer):
        return self._track(rid, src, name, nbytes, peer)

    def bind(self, mr_type, dict dests, slow_src, slow_dest, post_error):
        """The engine's argument resolution and its exceptions for posts
        that fail (see the fields)."""
        self.mr_type = mr_type
        self.dests = dests
        self.slow_src = slow_src
        self.slow_dest = slow_dest
        self.post_error = post_error

    cdef inline int _live_for(self, str name) except -1:
        """_live, the exception being the engine's for a post named `name`."""
        if self._stopped():
            raise self.post_error(CoreError(FI_ESHUTDOWN, "engine is stopped"), name, 0, None)
        return 0

    cdef inline CoreMR _src(self, object src_mr):
        """A MemoryRegion of this engine -> its CoreMR, without a Python frame."""
        cdef object o
        if type(src_mr) is self.mr_type:
            o = getattr(src_mr, "_core")
            if type(o) is CoreMR and (<CoreMR>o).engine is self.core:
                return <CoreMR>o
        return <CoreMR?>self.slow_src(src_mr)

    cdef inline Dest _dest(self, object dst):
        """A cached destination (descriptor bytes or RemoteRegion) -> Dest."""
        cdef PyObject *o = NULL
        if dst is self.last_dst and self.last_d is not None:   # (None is no destination)
            return self.last_d
        if self.dests is not None:
            o = PyDict_GetItem(self.dests, dst)   # NULL if absent or unhashable
        if o != NULL:
            self.last_dst = dst
            self.last_d = <Dest>o
            return <Dest>o
        return <Dest?>self.slow_dest(dst)

    # --------------------------------------------------------------- hot path

    def write(self, src_mr, dst, *, length=None, src_offset=0, dst_offset=0, imm=None):
        """Write ``length`` bytes (default: the rest of src_mr) from src_mr at
        src_offset into dst at dst_offset; deliver ``imm`` (if given) once,
        after every byte is in place.  Returns an awaitable.

        (TransferEngine.write: a running engine's ``write`` is this method,
        which resolves, checks, posts and tracks the write without a Python
        frame.)"""
        cdef uint64_t so, do, n, iv = 0, rid_c, did
        cdef bint has_imm = imm is not None
        cdef int rc
        cdef CoreMR src
        cdef Dest d
        cdef atx_engine *e
        cdef const atx_mr *smr
        self._live_for("write")
        src = self._src(src_mr)
        d = self._dest(dst)
        if src is None or not src.registered:
            raise ValueError("src_mr is deregistered")
        so = _arg_u64("src_offset", src_offset, 0) if src_offset is not 0 else 0
        do = _arg_u64("dst_offset", dst_offset, 0) if dst_offset is not 0 else 0
        if so > src.mr.len:
            raise ValueError(f"src_offset {so} exceeds src_mr's {src.mr.len} bytes")
        n = src.mr.len - so if length is None else _arg_u64("length", length, 0)
        if n > src.mr.len - so:
            raise ValueError(f"src_offset {so} + length {n} exceeds src_mr's {src.mr.len} bytes")
        if do > d.nbytes or n > d.nbytes - do:
            raise ValueError(f"dst_offset {do} + length {n} exceeds dst's {d.nbytes} bytes")
        if has_imm:
            iv = _arg_u64("imm", imm, IMM_LIMIT)
        rid = self.next_id
        self.next_id = rid + 1
        e = self.core.e
        smr = &src.mr
        rid_c = rid
        did = d.id
        if n >= NOGIL_POST_BYTES:
            # a large post can take milliseconds (the shm copy lane copies
            # in it; a shm post waits for the target's region lock): other
            # Python threads run meanwhile.  (The engine is the loop's: no
            # other thread calls into it; src stays referenced here.)
            with nogil:
                rc = atx_post_write(e, rid_c, smr, so, did, do, n, has_imm, <uint32_t>iv)
        else:
            rc = atx_post_write(e, rid_c, smr, so, did, do, n, has_imm, <uint32_t>iv)
        if rc:
            raise self.post_error(CoreError(rc, f"write: {atx_strerror(rc).decode()} ({rc})"),
                                  "write", 0, d.peer_name) from None
        return self._track(rid, src, "write", n, d.peer_name)

    def write_imm(self, dst, imm):
        """Deliver only an immediate to dst's owner (a zero-byte write).

        (TransferEngine.write_imm: a running engine's ``write_imm`` is this
        method.)"""
        cdef Dest d
        cdef uint64_t iv
        cdef int rc
        self._live_for("write_imm")
        d = self._dest(dst)
        iv = _arg_u64("imm", imm, IMM_LIMIT)
        rid = self.next_id
        self.next_id = rid + 1
        rc = atx_post_write(self.core.e, rid, NULL, 0, d.id, 0, 0, True, <uint32_t>iv)
        if rc:
            raise self.post_error(CoreError(rc, f"write_imm: {atx_strerror(rc).decode()} ({rc})"),
                                  "write_imm", 0, d.peer_name) from None
        return self._track(rid, None, "write_imm", 0, d.peer_name)

    # ------------------------------------------------------------- immediates

    def expect(self, uint32_t imm, uint64_t count):
        """None if `count` arrivals were available (consumed now); else
        (waiter id, future) -- the future resolves when the waiter fires."""
        cdef PendingWait w
        self._live()
        wid = self.next_id
        self.next_id = wid + 1
        if atx_imm_expect(self.core.e, imm, count, wid):
            return None
        w = PendingWait.__new__(PendingWait)
        w.fut = self.create_future()
        w.imm = imm
        w.count = count
        self.waiters[wid] = w
        return wid, w.fut

    def abandon(self, uint64_t wid):
        """The caller of waiter `wid` stopped waiting (cancelled, timed out).
        Arrivals are never lost: if it already fired, they are given back."""
        cdef PendingWait w
        cdef object o = self.waiters.get(wid)
        if o is None:
            return
        w = <PendingWait>o
        if self.core.e != NULL and atx_imm_cancel(self.core.e, w.imm, wid):
            del self.waiters[wid]
        # else: it fired in C; its record will credit the arrivals back
        if not w.fut.done():
            w.fut.cancel()

    # ------------------------------------------------------- loop polling

    cdef void _start_polling(self):
        if self.poll_window == 0 or self.closed or self.core.e == NULL:
            return
        self.polling = True
        self.poll_starts += 1
        atx_app_polling(self.core.e, 1)
        self._schedule_tick()

    cdef inline void _schedule_tick(self):
        if self.tick_handle is not None:
            self.ready.append(self.tick_handle)
        else:
            self.call_soon(self.tick)

    def _tick(self):
        """One poll from the event loop; again soon while work is pending
        and the last activity is within poll_window, else hand back to the
        worker (and drain what it published before it knew)."""
        cdef atx_engine *e = self.core.e
        cdef int r
        cdef uint64_t took
        if e == NULL or self.closed:
            self.polling = False
            return
        # A poll that posts queued work or moves a stream through a tcp
        # socket takes up to a millisecond (a queued copy-lane write up to
        # 1 ms per 16 MiB); other Python threads may run meanwhile.  Polls
        # of small work take well under a microsecond, less than handing
        # the GIL over and back: the GIL goes only after a long poll.
        if self.poll_long:
            with nogil:
                r = _timed_poll(e, self.poll_window, &took)
            self.ticks_nogil += 1
        else:
            r = _timed_poll(e, self.poll_window, &took)
        self.poll_long = took >= POLL_NOGIL_NS
        self.ticks += 1
        if not (r & ATX_POLL_RECORDS) and (r & ATX_POLL_AGAIN) and self.ready is not None \
                and not self.ready:
            # nothing else is ready in the loop: poll in C for a while (an
            # iteration of the loop costs microseconds; so does a wake-up)
            with nogil:
                r = atx_app_spin(e, self.poll_window, self.spin_max)
        if r & ATX_POLL_RECORDS:
            self._dispatch_safe(False)
        if (r & ATX_POLL_AGAIN) and not self.closed:
            # (also with nothing pending: the next operation usually follows)
            self._schedule_tick()
            return
        self.polling = False
        if self.core.e != NULL and not self.closed:
            atx_app_polling(e, 0)
            self._dispatch_safe(False)

    cdef bint _loop_idle(self):
        """Nothing in the loop's run queue but (perhaps) our own tick."""
        cdef object ready = self.ready
        if ready is None:
            return False
        if not ready:
            return True
        return len(ready) == 1 and (ready[0] is self.tick_handle
                                    or getattr(ready[0], "_callback", None) is self.tick)

    def spin(self, fut):
        """An awaiter is about to wait for fut and the loop has nothing else
        ready: poll in C (without the GIL) for up to spin_max until fut is
        done, so that a quick answer costs no trip through the loop."""
        cdef atx_engine *e = self.core.e
        cdef uint64_t end, t
        cdef int r
        if e == NULL or self.closed or not self.poll_window or not self._loop_idle():
            return
        end = atx_now_ns() + self.spin_max
        while not fut.done():
            t = atx_now_ns()
            if t >= end:
                break
            with nogil:
                r = atx_app_spin(e, self.poll_window, end - t)
            if r & ATX_POLL_RECORDS:
                self.dispatch(False, False)
            elif not (r & ATX_POLL_AGAIN):
                break
            if self.closed or self.core.e == NULL:
                break

    # -------------------------------------------------------------- dispatch

    def _on_readable(self):
        if self.core.e != NULL:
            atx_notify_clear(self.core.e)
        self._dispatch_safe(True)

    cdef void _dispatch_safe(self, bint progress):
        try:
            self.dispatch(False, progress)
        except BaseException as exc:  # never into the loop's machinery
            self.loop.call_exception_handler({
                "message": "aiotransfer: error while dispatching completions",
                "exception": exc})

    cpdef dispatch(self, bint closing, bint progress=True):
        cdef size_t n, i
        cdef atx_record *r
        cdef PendingOp op
        cdef PendingWait w
        cdef object o, text
        cdef atx_engine *e = self.core.e
        if e == NULL:
            return
        if progress and not closing:
            atx_progress(e)   # collect what is ready now: more records per wake-up
        while True:
            n = atx_drain(e, self.core.recs, DRAIN_BATCH)
            for i in range(n):
                r = &self.core.recs[i]
                if r.kind == ATX_REC_OP:
                    text = None
                    if r.data != NULL:
                        text = r.data[:strlen(r.data)].decode("utf-8", "replace")
                        free(r.data)
                        r.data = NULL
                    o = self.ops.pop(r.id, None)
                    if o is None:
                        continue
                    op = <PendingOp>o
                    if op.src is not None:
                        op.src.inflight -= 1
                    if op.fut.done():
                        continue   # abandoned by its caller; the buffer is free only now
                    if r.status == 0:
                        op.fut.set_result(None)
                    else:
                        op.fut.set_exception(self.make_error(op, r.status, text, closing))
                elif r.kind == ATX_REC_WAITER:
                    o = self.waiters.pop(r.id, None)
                    if o is None:
                        continue
                    w = <PendingWait>o
                    if w.fut.done():
                        atx_imm_credit(e, w.imm, w.count)  # fired after its caller left
                    else:
                        w.fut.set_result(None)
                elif r.kind == ATX_REC_MSG:
                    data = PyBytes_FromStringAndSize(r.data, r.bytes)
                    free(r.data)
                    r.data = NULL
                    self.on_message(data)
                else:
                    free(r.data)
                    r.data = NULL
            if n < DRAIN_BATCH:
                break

    def close(self, closed_exc):
        """Stop the worker and resolve every future (EngineClosedError)."""
        cdef PendingOp op
        cdef PendingWait w
        if self.closed:
            return
        self.loop.remove_reader(self.fd)   # remove the reader first, then close the fd
        self.core.stop()
        self.dispatch(True)
        self.closed = True
        self.last_dst = None
        self.last_d = None
        for o in list(self.ops.values()):
            op = <PendingOp>o
            if op.src is not None:
                op.src.inflight -= 1
            if not op.fut.done():
                op.fut.set_exception(self.make_error(op, FI_ECANCELED, "engine closed", True))
        self.ops.clear()
        for o in self.waiters.values():
            w = <PendingWait>o
            if not w.fut.done():
                w.fut.set_exception(closed_exc)
        self.waiters.clear()
