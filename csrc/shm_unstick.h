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

#ifdef __cplusplus
}
#endif
#endif
