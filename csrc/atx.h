/*
 * atx: the synchronous C core of aiotransfer.
 *
 * One engine = one libfabric endpoint per NIC, all progressed by one worker
 * thread (and inline by the posting thread, under one progress lock).
 * Python never touches a libfabric object.  Every work request picks its
 * NIC when it is posted (the NIC selector, see choose_nic in atx.c); the
 * worker polls the completion queues, counts immediates and hands
 * completion records back through a queue, waking the event loop through
 * an eventfd once per burst.
 *
 * Nothing in this file calls the Python C API.
 */
#ifndef ATX_H
#define ATX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ATX_MAX_NICS 16
#define ATX_ERRLEN 256

/* Completion record kinds */
enum {
    ATX_REC_OP = 1,     /* an operation finished (status 0 or -errno) */
    ATX_REC_WAITER = 2, /* an immediate waiter reached its threshold */
    ATX_REC_MSG = 3,    /* a control message arrived (data/len valid) */
};

typedef struct atx_record {
    uint64_t id;        /* op id, waiter id; 0 for messages */
    int32_t kind;
    int32_t status;     /* 0 or negative fi_errno */
    int32_t prov_errno;
    int32_t pad;
    uint64_t bytes;     /* bytes moved (ops) / message length */
    char *data;         /* malloc'd: message payload or error text; receiver frees */
} atx_record;

typedef struct atx_config {
    const char *provider;     /* exact libfabric provider name, e.g. "tcp;ofi_rxm" */
    const char *domains[ATX_MAX_NICS]; /* domain (NIC) names; ndomains 0: the first */
    int ndomains;
    int delivery_complete;    /* 1: FI_DELIVERY_COMPLETE on every write */
    size_t msg_size;          /* max control message payload */
    int msg_count;            /* posted receive buffers */
    int cpu;                  /* pin the worker to this CPU, -1: no pinning */
    size_t max_chunk;         /* split single writes into chunks of at most this */
    size_t tx_depth;          /* work requests in flight per NIC, 0: provider's queue size */
    int no_wait_fd;           /* never block on the CQ's wait fd: poll with backoff */
    uint64_t engine_id;       /* this engine's id (its address); tokens and MSG_HELLO */
    uint64_t failover_ns;     /* a lane with work in flight and no completion this long is
                               * declared down; its work goes over other lanes (0: 1 s) */
    size_t stripe;            /* several NICs: single writes split into stripes of this */
    size_t nic_budget;        /* several NICs: bytes in flight per NIC before choosing another */
    uint64_t peer_timeout_ns; /* no completion from a peer this long while operations to it
                               * wait: they fail with -FI_ETIMEDOUT (0: 5 s) */
    int endpoints;            /* endpoints opened on each NIC (0: 1); each is a NIC of the
                               * engine for the selector, lanes and failover: NIC d's
                               * endpoint k is engine NIC d * endpoints + k */
    int copy_lane;            /* shm, two or more endpoints: endpoint 0 of each NIC is a
                               * copy lane (this process copies its writes itself; see
                               * post_one in atx.c) */
} atx_config;

typedef struct atx_nic_info {
    char name[64];
    char fabric[64];
    uint64_t link_speed;      /* bit/s, 0 unknown */
    uint64_t mr_mode;
    uint64_t mode;
    size_t max_msg_size;
    size_t inject_size;
    size_t cq_data_size;
    size_t tx_size;
    int wait_fd;              /* CQ has a usable wait fd */
    int virt_addr;            /* FI_MR_VIRT_ADDR */
    int prov_key;
    int mr_local;
    int rx_cq_data;
    int mr_endpoint;
    int delivery_complete;    /* in use */
    int data_progress_manual;
    int endpoint;             /* which endpoint of its NIC (0 .. endpoints - 1) */
    int copy_lane;            /* shm: this process copies its writes itself (atx.c) */
} atx_nic_info;

typedef struct atx_engine atx_engine;

/* A registered memory region: one MR per NIC. */
typedef struct atx_mr {
    void *addr;
    size_t len;
    int nnics;
    void *fid[ATX_MAX_NICS];   /* struct fid_mr* */
    void *desc[ATX_MAX_NICS];  /* fi_mr_desc */
    uint64_t key[ATX_MAX_NICS];
    uint64_t base[ATX_MAX_NICS]; /* remote address of byte 0 as peers must use it */
    void *reg;                 /* the engine's own record of the registration (atx.c) */
} atx_mr;

/* One row of a scatter: len bytes from src_off to dst_off of destination
 * `dest` (an id from atx_dest_add). */
typedef struct atx_scatter_entry {
    uint64_t dest;
    uint64_t src_off;
    uint64_t dst_off;
    uint64_t len;
} atx_scatter_entry;

/* --- engine lifecycle --- */
int atx_engine_create(const atx_config *cfg, atx_engine **out, char *err, size_t errlen);
int atx_engine_notify_fd(atx_engine *e);
int atx_engine_nic_count(atx_engine *e);
const atx_nic_info *atx_engine_nic(atx_engine *e, int i);
/* raw endpoint name of NIC i */
int atx_engine_getname(atx_engine *e, int nic, void *buf, size_t *len);
/* Stop the worker: every queued and in-flight operation completes with
 * -FI_ECANCELED, the endpoints are closed (the NIC no longer touches any
 * buffer) and the worker thread is joined.  Safe to call twice. */
void atx_engine_stop(atx_engine *e);
/* Free everything; call after atx_engine_stop and after draining records. */
void atx_engine_destroy(atx_engine *e);

/* --- synchronous commands (run on the worker, caller blocks) --- */
int atx_mr_reg(atx_engine *e, void *addr, size_t len, int remote_read, atx_mr *out,
               char *err, size_t errlen);
int atx_mr_dereg(atx_engine *e, atx_mr *mr);
/* Insert a peer (one raw endpoint name per NIC of the peer: 1..ATX_MAX_NICS,
 * not necessarily as many as ours; engine_id from its address); returns the
 * peer index.  NICs pair as lanes: lane k < max(L, R) joins our NIC k % L
 * with the peer's NIC k % R.  With 8 bytes of CQ data the engine says hello
 * to the peer, which gives it a slot: its immediates then carry tokens the
 * peer deduplicates (an immediate re-sent over another lane counts once). */
int atx_peer_insert(atx_engine *e, int nnames, const void *const *names, const size_t *lens,
                    uint64_t engine_id, uint64_t *peer_out, char *err, size_t errlen);
/* A remote region of peer `peer`: (base, key) per NIC of the peer.  Returns
 * its id, which operations name; ids stay valid for the engine's life. */
int atx_dest_add(atx_engine *e, uint64_t peer, int n, const uint64_t *bases,
                 const uint64_t *keys, uint64_t *dest_out, char *err, size_t errlen);
/* Relative share of NIC i in the selector (link speed, any unit); 0 takes
 * the NIC out of the selection (it still receives). */
int atx_nic_set_weight(atx_engine *e, int nic, uint64_t weight);

/* --- asynchronous operations (return immediately; completion is a record) --- */
int atx_post_write(atx_engine *e, uint64_t id, const atx_mr *src, uint64_t src_off,
                   uint64_t dest, uint64_t dst_off, uint64_t len,
                   int has_imm, uint32_t imm);
/* Takes ownership of the page arrays (malloc'd, int64). */
int atx_post_paged(atx_engine *e, uint64_t id, const atx_mr *src, uint64_t src_off,
                   uint64_t src_stride, int64_t *src_pages, uint64_t dest,
                   uint64_t dst_off, uint64_t dst_stride, int64_t *dst_pages,
                   uint64_t npages, uint64_t page_size, int has_imm, uint32_t imm);
/* Takes ownership of entries (malloc'd). */
int atx_post_scatter(atx_engine *e, uint64_t id, const atx_mr *src,
                     atx_scatter_entry *entries, uint64_t n, int has_imm, uint32_t imm);
int atx_post_send(atx_engine *e, uint64_t id, uint64_t peer, const void *data, size_t len);

/* --- immediate counters --- */
/* If `need` arrivals of imm are available, consume them and return 1.
 * Otherwise queue waiter `id` (FIFO per immediate) and return 0; a
 * ATX_REC_WAITER record follows when it fires. */
int atx_imm_expect(atx_engine *e, uint32_t imm, uint64_t need, uint64_t id);
/* Remove a queued waiter; 1 if removed, 0 if it had already fired. */
int atx_imm_cancel(atx_engine *e, uint32_t imm, uint64_t id);
/* Give back arrivals (a fired waiter whose future was cancelled). */
void atx_imm_credit(atx_engine *e, uint32_t imm, uint64_t n);
void atx_imm_value(atx_engine *e, uint32_t imm, uint64_t *available, uint64_t *total);
/* pin > 0: an ImmCounter view of imm exists (its total is kept); pin <= 0:
 * one went away.  A counter with nothing to consume, no waiter and no view
 * is forgotten once the table holds more than 2048 values (half the bound
 * $AIOTRANSFER_MAX_IMM_VALUES, if that is less). */
void atx_imm_pin(atx_engine *e, uint32_t imm, int pin);
/* Distinct values the counter table holds now. */
size_t atx_imm_values(atx_engine *e);

/* --- completions --- */
/* Progress from the calling thread if nobody else is (non-blocking). */
size_t atx_progress(atx_engine *e);
/* The application thread starts/stops polling (atx_app_poll from its event
 * loop): meanwhile the worker stands back (it still scans for stalls, and
 * progresses if the app's polls stop for a millisecond), and records are
 * published without waking the loop: the app drains them.  Stopping wakes
 * the worker; the app then drains once more. */
void atx_app_polling(atx_engine *e, int on);
/* One poll of the application's loop: progress (unless the worker holds the
 * lock), then ATX_POLL_RECORDS if records wait to be drained, and
 * ATX_POLL_AGAIN if this or a poll within window_ns found work. */
#define ATX_POLL_RECORDS 1
#define ATX_POLL_AGAIN 2
int atx_app_poll(atx_engine *e, uint64_t window_ns);
/* atx_app_poll again and again, for at most max_ns, until records wait or
 * the window has passed (the caller's loop has nothing else to run). */
int atx_app_spin(atx_engine *e, uint64_t window_ns, uint64_t max_ns);
/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t atx_now_ns(void);
/* Are records waiting to be drained? */
int atx_pending(atx_engine *e);
/* Move up to max records into out; returns the count. */
size_t atx_drain(atx_engine *e, atx_record *out, size_t max);
/* Read the loop's eventfd (it was readable): one wake-up consumed. */
void atx_notify_clear(atx_engine *e);

/* statistics */
typedef struct atx_stats {
    uint64_t ops_posted, wrs_posted, wrs_completed, bytes_written;
    uint64_t imms_received, msgs_received, errors, eagain;
    uint64_t wakeups, polls;
    uint64_t imms_dropped;    /* arrivals of new values beyond the counter table's bound */
    uint64_t imms_duplicate;  /* immediates seen twice (re-sent over another lane): not counted */
    uint64_t msgs_bad;        /* malformed or unknown control messages: dropped */
    uint64_t lanes_down;      /* times a lane to a peer was declared down (failover) */
    uint64_t wrs_resent;      /* work requests posted again over another lane */
    uint64_t locks_released;  /* shm: peer region locks left taken by a dead process, freed */
    uint64_t wrs_copied;      /* shm copy lane: work requests whose bytes this process copied */
    uint64_t copies_refused;  /* shm copy lane: writes the target's key table did not admit */
    uint64_t inflight_bytes;  /* payload posted on this NIC, not yet completed */
    uint64_t weight;          /* the NIC's share in the selector */
} atx_stats;
void atx_engine_stats(atx_engine *e, int nic, atx_stats *out);

const char *atx_strerror(int err);

#ifdef __cplusplus
}
#endif
#endif
