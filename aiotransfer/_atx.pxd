# Declarations of the C core (csrc/atx.h), verbatim.
from libc.stdint cimport uint64_t, uint32_t, int64_t, int32_t


cdef extern from "atx.h" nogil:
    enum:
        ATX_MAX_NICS
        ATX_ERRLEN
        ATX_REC_OP
        ATX_REC_WAITER
        ATX_REC_MSG

    ctypedef struct atx_record:
        uint64_t id
        int32_t kind
        int32_t status
        int32_t prov_errno
        uint64_t bytes
        char *data

    ctypedef struct atx_config:
        const char *provider
        const char *domains[16]
        int ndomains
        int delivery_complete
        size_t msg_size
        int msg_count
        int cpu
        size_t max_chunk
        size_t tx_depth
        int no_wait_fd
        uint64_t engine_id
        uint64_t failover_ns
        size_t stripe
        size_t nic_budget
        uint64_t peer_timeout_ns
        int endpoints
        int copy_lane

    ctypedef struct atx_nic_info:
        char name[64]
        char fabric[64]
        uint64_t link_speed
        uint64_t mr_mode
        uint64_t mode
        size_t max_msg_size
        size_t inject_size
        size_t cq_data_size
        size_t tx_size
        int wait_fd
        int virt_addr
        int prov_key
        int mr_local
        int rx_cq_data
        int mr_endpoint
        int delivery_complete
        int data_progress_manual
        int endpoint
        int copy_lane

    ctypedef struct atx_engine:
        pass

    ctypedef struct atx_mr:
        void *addr
        size_t len
        int nnics
        void *fid[16]
        void *desc[16]
        uint64_t key[16]
        uint64_t base[16]

    ctypedef struct atx_scatter_entry:
        uint64_t dest
        uint64_t src_off
        uint64_t dst_off
        uint64_t len

    ctypedef struct atx_stats:
        uint64_t ops_posted, wrs_posted, wrs_completed, bytes_written
        uint64_t imms_received, msgs_received, errors, eagain
        uint64_t wakeups, polls
        uint64_t imms_dropped
        uint64_t inflight_bytes
        uint64_t weight
        uint64_t imms_duplicate
        uint64_t msgs_bad
        uint64_t lanes_down
        uint64_t wrs_resent
        uint64_t locks_released
        uint64_t wrs_copied
        uint64_t copies_refused

    int atx_engine_create(const atx_config *cfg, atx_engine **out, char *err, size_t errlen)
    int atx_engine_notify_fd(atx_engine *e)
    int atx_engine_nic_count(atx_engine *e)
    const atx_nic_info *atx_engine_nic(atx_engine *e, int i)
    int atx_engine_getname(atx_engine *e, int nic, void *buf, size_t *len)
    void atx_engine_stop(atx_engine *e)
    void atx_engine_destroy(atx_engine *e)

    int atx_mr_reg(atx_engine *e, void *addr, size_t len, int remote_read, atx_mr *out,
                   char *err, size_t errlen)
    int atx_mr_dereg(atx_engine *e, atx_mr *mr)
    int atx_peer_insert(atx_engine *e, int nnames, const void *const *names, const size_t *lens,
                        uint64_t engine_id, uint64_t *peer_out, char *err, size_t errlen)
    int atx_dest_add(atx_engine *e, uint64_t peer, int n, const uint64_t *bases,
                     const uint64_t *keys, uint64_t *dest_out, char *err, size_t errlen)
    int atx_nic_set_weight(atx_engine *e, int nic, uint64_t weight)

    int atx_post_write(atx_engine *e, uint64_t id, const atx_mr *src, uint64_t src_off,
                       uint64_t dest, uint64_t dst_off, uint64_t len,
                       int has_imm, uint32_t imm)
    int atx_post_paged(atx_engine *e, uint64_t id, const atx_mr *src, uint64_t src_off,
                       uint64_t src_stride, int64_t *src_pages, uint64_t dest,
                       uint64_t dst_off, uint64_t dst_stride, int64_t *dst_pages,
                       uint64_t npages, uint64_t page_size, int has_imm, uint32_t imm)
    int atx_post_scatter(atx_engine *e, uint64_t id, const atx_mr *src,
                         atx_scatter_entry *entries, uint64_t n, int has_imm, uint32_t imm)
    int atx_post_send(atx_engine *e, uint64_t id, uint64_t peer, const void *data, size_t len)

    int atx_imm_expect(atx_engine *e, uint32_t imm, uint64_t need, uint64_t id)
    int atx_imm_cancel(atx_engine *e, uint32_t imm, uint64_t id)
    void atx_imm_credit(atx_engine *e, uint32_t imm, uint64_t n)
    void atx_imm_value(atx_engine *e, uint32_t imm, uint64_t *available, uint64_t *total)
    void atx_imm_pin(atx_engine *e, uint32_t imm, int pin)
    size_t atx_imm_values(atx_engine *e)

    size_t atx_progress(atx_engine *e)
    void atx_app_polling(atx_engine *e, int on)
    int atx_app_poll(atx_engine *e, uint64_t window_ns)
    int atx_app_spin(atx_engine *e, uint64_t window_ns, uint64_t max_ns)
    uint64_t atx_now_ns()
    int ATX_POLL_RECORDS, ATX_POLL_AGAIN
    int atx_pending(atx_engine *e)
    size_t atx_drain(atx_engine *e, atx_record *out, size_t max)
    void atx_notify_clear(atx_engine *e)
    void atx_engine_stats(atx_engine *e, int nic, atx_stats *out)
    const char *atx_strerror(int err)


cdef extern from "rdma/fabric.h" nogil:
    cdef struct fi_fabric_attr:
        char *name
        char *prov_name
    cdef struct fi_domain_attr:
        char *name
    cdef struct fi_link_attr:
        size_t speed
    cdef struct fid_nic:
        fi_link_attr *link_attr
    cdef struct fi_ep_attr:
        int type
    cdef struct fi_info:
        fi_info *next
        uint64_t caps
        uint32_t addr_format
        fi_ep_attr *ep_attr
        fi_domain_attr *domain_attr
        fi_fabric_attr *fabric_attr
        fid_nic *nic
    fi_info *fi_allocinfo()
    void fi_freeinfo(fi_info *info)
    int fi_getinfo(uint32_t version, const char *node, const char *service, uint64_t flags,
                   const fi_info *hints, fi_info **info)
    uint32_t FI_VERSION(int major, int minor)
    const char *fi_strerror(int errnum)
    uint64_t FI_RMA, FI_WRITE, FI_REMOTE_WRITE, FI_MSG
    int FI_EP_RDM
    uint32_t FI_SOCKADDR_IN
