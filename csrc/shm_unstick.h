/* libfabric 1.17 shm: release a peer region's lock whose holder died
 * (see shm_unstick.c). */
#ifndef ATX_SHM_UNSTICK_H
#define ATX_SHM_UNSTICK_H
#ifdef __cplusplus
extern "C" {
#endif

/* Release every taken lock of a mapped 1.17 shm peer region whose owner
 * process no longer exists.  Returns the number released; *found (if not
 * NULL) gets the number of such dead-owner regions mapped here. */
int atx_shm_unstick(int *found);

#ifdef __cplusplus
}
#endif
#endif
