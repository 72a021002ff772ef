/* libfabric 1.17 shm: release a peer region's lock whose holder died
 * (see shm_unstick.c). */
#ifndef ATX_SHM_UNSTICK_H
#define ATX_SHM_UNSTICK_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* Release every taken lock of a mapped 1.17 shm peer region whose owner
 * process no longer exists.  Returns the number released. */
int atx_shm_unstick(void);

/* The head of our own region mapped from /dev/shm/<name> (1.17 layout,
 * owned by this process), or NULL.  Valid while the endpoint is open. */
void *atx_shm_own_region(const char *name);

/* Is the region's lock taken (x86-64 only; elsewhere 0)?  *moves: a count
 * that changes whenever a command is queued or taken off its queue. */
int atx_shm_region_taken(void *head, uint64_t *moves);

/* Is any mapped 1.17 region's owner process gone? */
int atx_shm_dead_peer(void);

/* Release the region's lock; 1 if it was taken.  Only for a lock whose
 * holder is known to be gone. */
int atx_shm_release_region(void *head);

#ifdef __cplusplus
}
#endif
#endif
