# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Synchronous core of aiotransfer: thin wrappers of the C progress engine.

Nothing here knows about asyncio.  Operations are posted with a caller-chosen
64-bit id and finish as records returned by :meth:`CoreEngine.drain`; the
futures layer (``aiotransfer.engine``) turns those into awaitables.
"""
from libc.stdint cimport uint64_t, uint32_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, strlen
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE,
                             PyBUF_C_CONTIGUOUS)
from cpython.bytes cimport PyBytes_FromStringAndSize

from aiotransfer._atx cimport *

cdef extern from "Python.h":
    # (no exception spec: the caller checks PyErr_Occurred itself)
    unsigned long long _long_as_ull "PyLong_AsUnsignedLongLong"(object) noexcept
    void* PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept

import errno as _errno
from asyncio import base_events as _asyncio_base
from asyncio import Future as _asyncio_Future, Handle as _asyncio_Handle

# public constants mirrored for the Python layer
REC_OP = ATX_REC_OP
REC_WAITER = ATX_REC_WAITER
REC_MSG = ATX_REC_MSG
FI_ECANCELED = -_errno.ECANCELED
FI_ESHUTDOWN = -_errno.ESHUTDOWN
FI_ETIMEDOUT = -_errno.ETIMEDOUT
FI_EBUSY = -_errno.EBUSY

cdef enum:
    DRAIN_BATCH = 1024
    # posts of this many bytes or more (page lists / scatters: entries) release
    # the GIL: they can take milliseconds (the shm copy lane copies inside
    # the post; a shm post waits for the target's region lock)
    NOGIL_POST_BYTES = 65536
    NOGIL_POST_ENTRIES = 64
    # a loop poll after one that took this many ns or more releases the GIL
    # (_futures.pxi, Completions._tick)
    POLL_NOGIL_NS = 50000


def strerror(int err):
    """libfabric's text for a (negative) error code."""
    return atx_strerror(err).decode("utf-8", "replace")


class CoreError(Exception):
    """An error from the C core: .code is the negative libfabric errno."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


cdef inline int _check(int rc, str what) except -1:
    if rc < 0:
        raise CoreError(rc, f"{what}: {atx_strerror(rc).decode()} ({rc})")
    return 0


cdef class CoreMR:
    """A buffer pinned (a live buffer export) and registered on every NIC."""
    cdef Py_buffer view
    cdef bint have_view
    cdef atx_mr mr
    cdef bint registered
    cdef CoreEngine engine
    cdef readonly object obj
    cdef public Py_ssize_t inflight   # operations posted from it, not yet completed

    def __dealloc__(self):
        if self.registered:
            # The engine still owns the registration: never free memory the
            # NIC may use.  Leak the view instead (the engine deregisters on close).
            return
        if self.have_view:
            PyBuffer_Release(&self.view)

    @property
    def address(self):
        return <uint64_t>self.mr.addr

    @property
    def nbytes(self):
        return self.mr.len

    @property
    def nnics(self):
        return self.mr.nnics

    def key(self, int nic):
        return self.mr.key[nic]

    def base(self, int nic):
        return self.mr.base[nic]

    @property
    def registered(self):
        return self.registered


cdef class CoreEngine:
    """One libfabric endpoint per NIC, driven by a C progress worker."""
    cdef atx_engine *e
    cdef atx_record *recs
    cdef bint stopped

    def __cinit__(self):
        self.e = NULL
        self.recs = <atx_record *>malloc(DRAIN_BATCH * sizeof(atx_record))
        if self.recs == NULL:
            raise MemoryError()

    def __init__(self, str provider, domains=None, *, bint delivery_complete=True,
                 size_t msg_size=65536, int msg_count=64, int cpu=-1, size_t max_chunk=0,
                 size_t tx_depth=0, bint wait_fd=True, size_t stripe=0, size_t nic_budget=0,
                 double peer_timeout=0, uint64_t engine_id=0, double failover=0,
                 int endpoints=1, bint copy_lane=False):
        """domains: None (the provider's first NIC), a name, or a list of names.
        endpoints: endpoints opened on each of them; NIC d's endpoint k is
        core NIC d * endpoints + k.  copy_lane: shm with two or more
        endpoints: endpoint 0 of each NIC copies its writes in this process."""
        cdef atx_config cfg
        cdef char err[256]
        cdef bytes prov_b = provider.encode()
        cdef list dom_b
        cdef int rc, i
        cdef atx_engine *eng = NULL
        memset(&cfg, 0, sizeof(cfg))
        if isinstance(domains, str):
            domains = [domains]
        dom_b = [d.encode() for d in (domains or [])]
        if len(dom_b) > 16:
            raise ValueError(f"{len(dom_b)} NICs asked for (at most 16)")
        cfg.provider = prov_b
        cfg.ndomains = len(dom_b)
        for i in range(cfg.ndomains):
            cfg.domains[i] = <bytes>dom_b[i]
        cfg.stripe = stripe
        cfg.nic_budget = nic_budget
        cfg.peer_timeout_ns = <uint64_t>(peer_timeout * 1e9)
        cfg.engine_id = engine_id
        cfg.failover_ns = <uint64_t>(failover * 1e9)
        cfg.delivery_complete = delivery_complete
        cfg.msg_size = msg_size
        cfg.msg_count = msg_count
        cfg.cpu = cpu
        cfg.max_chunk = max_chunk
        cfg.tx_depth = tx_depth
        cfg.endpoints = endpoints
        cfg.copy_lane = copy_lane
        cfg.no_wait_fd = not wait_fd
        err[0] = 0
        with nogil:
            rc = atx_engine_create(&cfg, &eng, err, sizeof(err))
        if rc:
            raise CoreError(rc, err.decode("utf-8", "replace"))
        self.e = eng

    def __dealloc__(self):
        cdef atx_record r
        if self.e != NULL:
            with nogil:
                atx_engine_stop(self.e)
            while atx_drain(self.e, &r, 1):
                free(r.data)
            atx_engine_destroy(self.e)
            self.e = NULL
        free(self.recs)

    cdef inline int _live(self) except -1:
        if self.e == NULL or self.stopped:
            raise CoreError(FI_ESHUTDOWN, "engine is stopped")
        return 0

    def fileno(self):
        self._live()
        return atx_engine_notify_fd(self.e)

    def nic_count(self):
        self._live()
        return atx_engine_nic_count(self.e)

    def nic_info(self, int i):
        self._live()
        cdef const atx_nic_info *n = atx_engine_nic(self.e, i)
        if n == NULL:
            raise IndexError(i)
        return {
            "name": n.name.decode(), "fabric": n.fabric.decode(),
            "link_speed": n.link_speed or None, "mr_mode": n.mr_mode, "mode": n.mode,
            "max_msg_size": n.max_msg_size, "inject_size": n.inject_size,
            "cq_data_size": n.cq_data_size, "tx_size": n.tx_size,
            "wait_fd": bool(n.wait_fd), "virt_addr": bool(n.virt_addr),
            "prov_key": bool(n.prov_key), "mr_local": bool(n.mr_local),
            "rx_cq_data": bool(n.rx_cq_data), "mr_endpoint": bool(n.mr_endpoint),
            "delivery_complete": bool(n.delivery_complete),
            "data_progress_manual": bool(n.data_progress_manual),
            "endpoint": n.endpoint, "copy_lane": bool(n.copy_lane),
        }

    def getname(self, int nic):
        self._live()
        cdef char buf[256]
        cdef size_t n = sizeof(buf)
        _check(atx_engine_getname(self.e, nic, buf, &n), "fi_getname")
        return PyBytes_FromStringAndSize(buf, n)

    def stats(self, int nic):
        cdef atx_stats s
        self._live()
        atx_engine_stats(self.e, nic, &s)
        return {"ops_posted": s.ops_posted, "wrs_posted": s.wrs_posted,
                "wrs_completed": s.wrs_completed, "bytes_written": s.bytes_written,
                "imms_received": s.imms_received, "msgs_received": s.msgs_received,
                "errors": s.errors, "eagain": s.eagain, "wakeups": s.wakeups,
                "polls": s.polls, "imms_dropped": s.imms_dropped,
                "inflight_bytes": s.inflight_bytes, "weight": s.weight,
                "imms_duplicate": s.imms_duplicate, "msgs_bad": s.msgs_bad,
                "lanes_down": s.lanes_down, "wrs_resent": s.wrs_resent,
                "locks_released": s.locks_released, "wrs_copied": s.wrs_copied,
                "copies_refused": s.copies_refused}

    def set_weight(self, int nic, uint64_t weight):
        """NIC `nic`'s share in the selector; 0 stops choosing it."""
        self._live()
        _check(atx_nic_set_weight(self.e, nic, weight), "set_weight")

    # ---------------------------------------------------------------- memory

    def register(self, obj, bint remote_read=False):
        """Pin obj's buffer (writable, C-contiguous) and register it."""
        cdef CoreMR m = CoreMR.__new__(CoreMR)
        cdef char err[256]
        cdef int rc
        self._live()
        PyObject_GetBuffer(obj, &m.view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
        m.have_view = True
        m.obj = obj
        m.engine = self
        err[0] = 0
        with nogil:
            rc = atx_mr_reg(self.e, m.view.buf, <size_t>m.view.len, remote_read, &m.mr,
                            err, sizeof(err))
        if rc:
            raise CoreError(rc, err.decode("utf-8", "replace"))
        m.registered = True
        return m

    def deregister(self, CoreMR m):
        cdef int rc = 0
        if not m.registered:
            return
        if self.e == NULL:
            return
        with nogil:
            rc = atx_mr_dereg(self.e, &m.mr)
        if rc == FI_EBUSY:
            raise BufferError("region still read by work requests at the NIC (an operation "
                              "failed early, its peer unreachable); retry later or close "
                              "the engine")
        m.registered = False
        PyBuffer_Release(&m.view)
        m.have_view = False
        m.obj = None
        _check(rc, "fi_close(mr)")

    def peer_insert(self, list names, uint64_t engine_id=0):
        """Add a peer (one raw endpoint name per NIC, its engine id); returns its index."""
        cdef int n = len(names), i, rc
        cdef const void *ptrs[16]
        cdef size_t lens[16]
        cdef uint64_t peer = 0
        cdef char err[256]
        self._live()
        if n < 1 or n > 16:
            raise ValueError(f"peer has {n} NICs (1..16 supported)")
        for i in range(n):
            ptrs[i] = <const char *>names[i]
            lens[i] = len(names[i])
        err[0] = 0
        with nogil:
            rc = atx_peer_insert(self.e, n, ptrs, lens, engine_id, &peer, err, sizeof(err))
        if rc:
            raise CoreError(rc, err.decode("utf-8", "replace"))
        return peer

    def dest_add(self, uint64_t peer, bases, keys):
        """A remote region of `peer`: one (base, key) per NIC of the peer; returns its id."""
        cdef uint64_t b[16]
        cdef uint64_t k[16]
        cdef uint64_t dest = 0
        cdef int n = len(bases), i, rc
        cdef char err[256]
        self._live()
        if n < 1 or n > 16 or len(keys) != n:
            raise ValueError(f"region lists {n} bases and {len(keys)} keys (1..16 NICs)")
        for i in range(n):
            b[i] = bases[i]
            k[i] = keys[i]
        err[0] = 0
        with nogil:
            rc = atx_dest_add(self.e, peer, n, b, k, &dest, err, sizeof(err))
        if rc:
            raise CoreError(rc, err.decode("utf-8", "replace"))
        return dest

    # ------------------------------------------------------------ operations

    def post_write(self, uint64_t id, CoreMR src, uint64_t src_off, uint64_t dest,
                   uint64_t dst_off, uint64_t length, bint has_imm, uint32_t imm):
        self._live()
        _check(atx_post_write(self.e, id, &src.mr if src is not None else NULL, src_off,
                              dest, dst_off, length, has_imm, imm), "write")

    def post_paged(self, uint64_t id, CoreMR src, uint64_t src_off, uint64_t src_stride,
                   const int64_t[::1] src_pages, uint64_t dest,
                   uint64_t dst_off, uint64_t dst_stride, const int64_t[::1] dst_pages,
                   uint64_t page_size, bint has_imm, uint32_t imm):
        """Page lists must already be validated (the Python layer does)."""
        cdef uint64_t n = src_pages.shape[0]
        cdef int rc
        cdef int64_t *sp
        cdef int64_t *dp
        self._live()
        if <uint64_t>dst_pages.shape[0] != n:
            raise ValueError("page lists differ in length")
        sp = <int64_t *>malloc(n * sizeof(int64_t) + 8)
        dp = <int64_t *>malloc(n * sizeof(int64_t) + 8)
        if sp == NULL or dp == NULL:
            free(sp)
            free(dp)
            raise MemoryError()
        if n:
            memcpy(sp, &src_pages[0], n * sizeof(int64_t))
            memcpy(dp, &dst_pages[0], n * sizeof(int64_t))
        if n >= NOGIL_POST_ENTRIES or n * page_size >= NOGIL_POST_BYTES:
            with nogil:
                rc = atx_post_paged(self.e, id, &src.mr, src_off, src_stride, sp, dest, dst_off,
                                    dst_stride, dp, n, page_size, has_imm, imm)
        else:
            rc = atx_post_paged(self.e, id, &src.mr, src_off, src_stride, sp, dest, dst_off,
                                dst_stride, dp, n, page_size, has_imm, imm)
        _check(rc, "write_paged")

    def post_scatter(self, uint64_t id, CoreMR src, const uint64_t[:, ::1] entries,
                     bint has_imm, uint32_t imm):
        """entries: (n, 4) uint64 rows of (dest id, src_off, dst_off, len)."""
        cdef uint64_t n = entries.shape[0]
        cdef int rc
        cdef atx_scatter_entry *ent
        self._live()
        if entries.shape[1] != 4:
            raise ValueError("scatter entries must have 4 columns")
        ent = <atx_scatter_entry *>malloc(n * sizeof(atx_scatter_entry) + 8)
        if ent == NULL:
            raise MemoryError()
        if n:
            memcpy(ent, &entries[0, 0], n * sizeof(atx_scatter_entry))
        cdef const atx_mr *smr = &src.mr if src is not None else NULL
        if n >= NOGIL_POST_ENTRIES:
            with nogil:
                rc = atx_post_scatter(self.e, id, smr, ent, n, has_imm, imm)
        else:
            rc = atx_post_scatter(self.e, id, smr, ent, n, has_imm, imm)
        _check(rc, "scatter")

    def post_send(self, uint64_t id, uint64_t peer, const unsigned char[::1] data):
        self._live()
        cdef size_t n = data.shape[0]
        cdef const unsigned char *p = &data[0] if n else NULL
        _check(atx_post_send(self.e, id, peer, p, n), "send")

    # ------------------------------------------------------------ immediates

    def imm_expect(self, uint32_t imm, uint64_t need, uint64_t id):
        self._live()
        return bool(atx_imm_expect(self.e, imm, need, id))

    def imm_cancel(self, uint32_t imm, uint64_t id):
        if self.e == NULL:
            return False
        return bool(atx_imm_cancel(self.e, imm, id))

    def imm_credit(self, uint32_t imm, uint64_t n):
        if self.e != NULL:
            atx_imm_credit(self.e, imm, n)

    def imm_value(self, uint32_t imm):
        cdef uint64_t avail = 0, total = 0
        if self.e != NULL:
            atx_imm_value(self.e, imm, &avail, &total)
        return avail, total

    def imm_pin(self, uint32_t imm, bint pin):
        """An ImmCounter view of imm came (pin) or went: a viewed value's
        counter is never forgotten.  Keeps the GIL: serialised with destroy()."""
        if self.e != NULL:
            atx_imm_pin(self.e, imm, 1 if pin else 0)

    def imm_values(self):
        """Distinct immediate values the counter table holds now."""
        return atx_imm_values(self.e) if self.e != NULL else 0

    # ----------------------------------------------------------- completions

    def drain(self):
        """Return the finished records as a list of
        (kind, id, status, prov_errno, nbytes, data) tuples."""
        cdef size_t n, i
        cdef atx_record *r
        cdef list out = []
        if self.e == NULL:
            return out
        while True:
            n = atx_drain(self.e, self.recs, DRAIN_BATCH)
            for i in range(n):
                r = &self.recs[i]
                if r.data != NULL:
                    if r.kind == ATX_REC_MSG:
                        data = PyBytes_FromStringAndSize(r.data, r.bytes)
                    else:
                        data = r.data[:strlen(r.data)].decode("utf-8", "replace")
                    free(r.data)
                    r.data = NULL
                else:
                    data = None
                out.append((r.kind, r.id, r.status, r.prov_errno, r.bytes, data))
            if n < DRAIN_BATCH:
                break
        return out

    def stop(self):
        """Stop the worker: queued and in-flight operations finish as
        cancelled records, endpoints close; the NIC touches no buffer after."""
        if self.e != NULL and not self.stopped:
            with nogil:
                atx_engine_stop(self.e)
            self.stopped = True

    def destroy(self):
        cdef atx_record r
        if self.e == NULL:
            return
        self.stop()
        while atx_drain(self.e, &r, 1):
            free(r.data)
        atx_engine_destroy(self.e)
        self.e = NULL


def fabric_info(provider=None):
    """List (provider, domain, fabric, link_speed) that offer what the engine needs."""
    cdef fi_info *hints = fi_allocinfo()
    cdef fi_info *lst = NULL
    cdef fi_info *i
    cdef int rc
    cdef bytes pb
    out = []
    if hints == NULL:
        raise MemoryError()
    hints.caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_MSG
    hints.ep_attr.type = FI_EP_RDM
    rc = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &lst)
    fi_freeinfo(hints)
    if rc:
        return out
    i = lst
    while i != NULL:
        prov = i.fabric_attr.prov_name.decode() if i.fabric_attr.prov_name else "?"
        if provider is None or prov == provider:
            speed = None
            if i.nic != NULL and i.nic.link_attr != NULL and i.nic.link_attr.speed:
                speed = i.nic.link_attr.speed
            out.append((prov, i.domain_attr.name.decode() if i.domain_attr.name else "?",
                        i.fabric_attr.name.decode() if i.fabric_attr.name else "?",
                        speed, i.addr_format == FI_SOCKADDR_IN))
        i = i.next
    fi_freeinfo(lst)
    return out


include "_futures.pxi"
