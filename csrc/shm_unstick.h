/* libfabric 1.17 shm: release a peer region's lock whose holder died
 * (see shm_unstick.c). */
#ifndef ATX_SHM_UNSTICK_H
#define ATX_SHM_UNSTICK_H
#ifdef __cplusplus
extern "C" {
#endif

/* Release every taken lock of a mapped 1.17 shm peer region whose owner
 * process no longer exists.  Returns the number released. */
int atx_shm_unstick(void);

/* Our own regions: those mapped from /dev/shm/<names[i]> and owned by this
 * process.  How many have their lock taken now (x86-64 only; elsewhere 0);
 * *dead_peers: how many mapped regions belong to processes that are gone. */
int atx_shm_own_taken(const char *const *names, int nnames, int *dead_peers);

/* Release the taken locks of our own regions named in names.  Returns the
 * number released.  Only for a lock whose holder is known to be gone. */
int atx_shm_release_own(const char *const *names, int nnames);

#ifdef __cplusplus
}
#endif
#endif
