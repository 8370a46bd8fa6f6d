/*
 * rvscsi_illumos.h: the project's own minimal declarations of exactly the
 * illumos kernel types, constants and functions that rvscsi_shim.c uses,
 * so that the module can be built where no illumos headers are at hand
 * (Linux CI). It is not a copy of the illumos headers: it declares only
 * what the shim touches, in the simplest form with the same ABI (the
 * DDI's command enums, for instance, are int-sized and declared as int).
 *
 * Nothing here is trusted by hand. build.rs generates
 * rvscsi_abi_asserts.h from the Rust mirrors (src/ffi/types.rs,
 * src/ffi/consts.rs), whose values a host test compares with the numbers
 * measured from the real headers (test/abi/); every structure below
 * defines RVSCSI_MINIMAL_DECLARES_<name> so that the generated
 * _Static_asserts check each of its member offsets and its size, and
 * every constant below is a macro so that they check its value. With
 * ILLUMOS_GATE set, build.rs also compiles the same asserts against the
 * real headers, and this file against them through c-shim/minimal/check.c.
 *
 * Every typedef below is spelled as illumos declares it (the handle types
 * are pointers to opaque structs: `typedef struct __dev_info *dev_info_t;`,
 * sys/dditypes.h), and tests/typedefs.rs checks each one against the
 * typedefs measured from the real headers (test/abi/illumos-typedefs.tsv).
 * Only names starting with rvscsi_ are the project's own.
 */

#ifndef	RVSCSI_ILLUMOS_H
#define	RVSCSI_ILLUMOS_H

#define	RVSCSI_MINIMAL_HEADERS	1

#define	NULL	((void *)0)

/* LP64 basic types (sys/types.h, sys/int_types.h). */
typedef unsigned char		uchar_t;
typedef unsigned short		ushort_t;
typedef unsigned int		uint_t;
typedef unsigned long		ulong_t;
typedef ulong_t			size_t;
typedef unsigned int		uint32_t;
typedef unsigned long		uint64_t;
typedef char			*caddr_t;
/* sys/scsi/scsi_types.h */
typedef void			*opaque_t;

/* sunddi.h return values */
#define	DDI_SUCCESS		0
#define	DDI_FAILURE		(-1)
#define	DDI_NOSLEEP		1

/*
 * ddi_fm_ereport_post(9F) (sys/ddifm.h) and its payload: the ereport
 * version (sys/fm/protocol.h) and the nvpair types (sys/nvpair.h, an enum
 * there, whose enumerators the shim passes as ints through the variadic
 * list, as with the real enum; marked for rvscsi_abi_asserts.h).
 */
#define	FM_VERSION		"version"
#define	FM_EREPORT_VERS0	0
enum {
	DATA_TYPE_UINT32 = 6,
	DATA_TYPE_UINT64 = 8,
	DATA_TYPE_STRING = 9,
	DATA_TYPE_UINT8 = 23
};
#define	RVSCSI_MINIMAL_ENUMERATOR_DATA_TYPE_UINT32	1
#define	RVSCSI_MINIMAL_ENUMERATOR_DATA_TYPE_UINT64	1
#define	RVSCSI_MINIMAL_ENUMERATOR_DATA_TYPE_STRING	1
#define	RVSCSI_MINIMAL_ENUMERATOR_DATA_TYPE_UINT8	1

/*
 * devops.h: the getinfo(9E), attach(9E), detach(9E) and reset commands,
 * enums as there. The enumerators the Rust side relies on are marked
 * RVSCSI_MINIMAL_ENUMERATOR_<name> so that rvscsi_abi_asserts.h checks
 * their values (an enumerator is not a macro that #if can see).
 */
typedef enum {
	DDI_INFO_DEVT2DEVINFO = 0,
	DDI_INFO_DEVT2INSTANCE = 1
} ddi_info_cmd_t;
typedef enum {
	DDI_ATTACH = 0,
	DDI_RESUME = 1,
	DDI_PM_RESUME = 2
} ddi_attach_cmd_t;
typedef enum {
	DDI_DETACH = 0,
	DDI_SUSPEND = 1,
	DDI_PM_SUSPEND = 2,
	DDI_HOTPLUG_DETACH = 3
} ddi_detach_cmd_t;
typedef enum {
	DDI_RESET_FORCE = 0
} ddi_reset_cmd_t;
#define	RVSCSI_MINIMAL_ENUMERATOR_DDI_ATTACH	1
#define	RVSCSI_MINIMAL_ENUMERATOR_DDI_DETACH	1
#define	DEVO_REV		4

/* modctl.h */
#define	MODREV_1		1
#define	MODMAXLINKINFOLEN	32

/* scsi/impl/transport.h: scsi_hba_attach_setup(9F), scsi_hba_tran_alloc(9F) */
#define	SCSI_HBA_TRAN_CDB	0x04
#define	SCSI_HBA_TRAN_SCB	0x08
#define	SCSI_HBA_HBA		0x10
#define	SCSI_HBA_ADDR_COMPLEX	0x40
#define	SCSI_HBA_CANSLEEP	0x01

/* sys/dditypes.h, sys/kmem.h, sys/scsi/impl/transport.h */
typedef struct __dev_info	*dev_info_t;
typedef struct __ddi_dma_handle	*ddi_dma_handle_t;
typedef struct kmem_cache	kmem_cache_t;
typedef struct __scsi_iportmap	scsi_hba_iportmap_t;
typedef struct __scsi_tgtmap	scsi_hba_tgtmap_t;
typedef struct scsi_hba_tran	scsi_hba_tran_t;

struct cb_ops;
struct bus_ops;
struct mod_ops;
struct modinfo;
struct scsi_address;
struct scsi_device;
struct scsi_pkt;
struct buf;

/* mutex(9F): one pointer of opaque state (sys/mutex.h). */
typedef struct mutex {
	void		*_opaque[1];
} kmutex_t;

/* ddi_dma_attr(9S) */
#define	RVSCSI_MINIMAL_DECLARES_ddi_dma_attr_t	1
typedef struct ddi_dma_attr {
	uint_t		dma_attr_version;
	uint64_t	dma_attr_addr_lo;
	uint64_t	dma_attr_addr_hi;
	uint64_t	dma_attr_count_max;
	uint64_t	dma_attr_align;
	uint_t		dma_attr_burstsizes;
	uint32_t	dma_attr_minxfer;
	uint64_t	dma_attr_maxxfer;
	uint64_t	dma_attr_seg;
	int		dma_attr_sgllen;
	uint32_t	dma_attr_granular;
	uint_t		dma_attr_flags;
} ddi_dma_attr_t;

/*
 * scsi_hba_tran(9S): every member, with the exact types of the vectors the
 * shim sets (so that the compiler checks the Rust entry points' types from
 * rvscsi.h); vectors it never sets are generic function pointers of the
 * same size.
 */
typedef void (*rvscsi_unused_vector_t)(void);

#define	RVSCSI_MINIMAL_DECLARES_scsi_hba_tran	1
struct scsi_hba_tran {
	dev_info_t	*tran_hba_dip;
	void		*tran_hba_private;
	void		*tran_tgt_private;
	struct scsi_device *tran_sd;
	int		(*tran_tgt_init)(dev_info_t *, dev_info_t *,
			    scsi_hba_tran_t *, struct scsi_device *);
	int		(*tran_tgt_probe)(struct scsi_device *,
			    int (*)(void));
	void		(*tran_tgt_free)(dev_info_t *, dev_info_t *,
			    scsi_hba_tran_t *, struct scsi_device *);
	int		(*tran_start)(struct scsi_address *,
			    struct scsi_pkt *);
	int		(*tran_reset)(struct scsi_address *, int);
	int		(*tran_abort)(struct scsi_address *,
			    struct scsi_pkt *);
	int		(*tran_getcap)(struct scsi_address *, char *, int);
	int		(*tran_setcap)(struct scsi_address *, char *, int,
			    int);
	rvscsi_unused_vector_t tran_init_pkt;
	rvscsi_unused_vector_t tran_destroy_pkt;
	rvscsi_unused_vector_t tran_dmafree;
	rvscsi_unused_vector_t tran_sync_pkt;
	rvscsi_unused_vector_t tran_reset_notify;
	rvscsi_unused_vector_t tran_get_bus_addr;
	rvscsi_unused_vector_t tran_get_name;
	rvscsi_unused_vector_t tran_clear_aca;
	rvscsi_unused_vector_t tran_clear_task_set;
	rvscsi_unused_vector_t tran_terminate_task;
	rvscsi_unused_vector_t tran_get_eventcookie;
	rvscsi_unused_vector_t tran_add_eventcall;
	rvscsi_unused_vector_t tran_remove_eventcall;
	rvscsi_unused_vector_t tran_post_event;
	int		(*tran_quiesce)(dev_info_t *);
	int		(*tran_unquiesce)(dev_info_t *);
	int		(*tran_bus_reset)(dev_info_t *, int);
	int		tran_hba_flags;
	uint_t		tran_obs1;
	uchar_t		tran_obs2;
	uchar_t		tran_obs3;
	kmutex_t	tran_open_lock;
	uint64_t	tran_open_flag;
	rvscsi_unused_vector_t tran_bus_config;
	rvscsi_unused_vector_t tran_bus_unconfig;
	rvscsi_unused_vector_t tran_bus_power;
	int		tran_interconnect_type;
	int		(*tran_pkt_constructor)(struct scsi_pkt *,
			    scsi_hba_tran_t *, int);
	void		(*tran_pkt_destructor)(struct scsi_pkt *,
			    scsi_hba_tran_t *);
	kmem_cache_t	*tran_pkt_cache_ptr;
	uint_t		tran_hba_len;
	int		(*tran_setup_pkt)(struct scsi_pkt *, int (*)(caddr_t),
			    caddr_t);
	void		(*tran_teardown_pkt)(struct scsi_pkt *);
	ddi_dma_attr_t	tran_dma_attr;
	void		*tran_extension;
	int		tran_fm_capable;
	dev_info_t	*tran_iport_dip;
	scsi_hba_iportmap_t *tran_iportmap;
	scsi_hba_tgtmap_t *tran_tgtmap;
};

/* dev_ops(9S) */
#define	RVSCSI_MINIMAL_DECLARES_dev_ops	1
struct dev_ops {
	int		devo_rev;
	int		devo_refcnt;
	int		(*devo_getinfo)(dev_info_t *, ddi_info_cmd_t, void *,
			    void **);
	int		(*devo_identify)(dev_info_t *);
	int		(*devo_probe)(dev_info_t *);
	int		(*devo_attach)(dev_info_t *, ddi_attach_cmd_t);
	int		(*devo_detach)(dev_info_t *, ddi_detach_cmd_t);
	int		(*devo_reset)(dev_info_t *, ddi_reset_cmd_t);
	struct cb_ops	*devo_cb_ops;
	struct bus_ops	*devo_bus_ops;
	int		(*devo_power)(dev_info_t *, int, int);
	int		(*devo_quiesce)(dev_info_t *);
};

/* modldrv(9S), modlinkage(9S) */
#define	RVSCSI_MINIMAL_DECLARES_modldrv	1
struct modldrv {
	struct mod_ops	*drv_modops;
	char		*drv_linkinfo;
	struct dev_ops	*drv_dev_ops;
};

#define	RVSCSI_MINIMAL_DECLARES_modlinkage	1
struct modlinkage {
	int		ml_rev;
	void		*ml_linkage[7];
};

/* The kernel functions and data the shim uses. */
extern struct mod_ops mod_driverops;
extern int mod_install(struct modlinkage *);
extern int mod_remove(struct modlinkage *);
extern int mod_info(struct modlinkage *, struct modinfo *);
extern int nodev();
extern int nulldev();
extern void *ddi_get_driver_private(dev_info_t *);
extern void ddi_report_dev(dev_info_t *);
extern int scsi_hba_init(struct modlinkage *);
extern void scsi_hba_fini(struct modlinkage *);
extern scsi_hba_tran_t *scsi_hba_tran_alloc(dev_info_t *, int);
extern void scsi_hba_tran_free(scsi_hba_tran_t *);
extern int scsi_hba_attach_setup(dev_info_t *, ddi_dma_attr_t *,
    scsi_hba_tran_t *, int);
extern int scsi_hba_detach(dev_info_t *);
extern char *scsi_hba_iport_unit_address(dev_info_t *);
extern int scsi_hba_iport_register(dev_info_t *, char *);
extern void ddi_fm_ereport_post(dev_info_t *, const char *, uint64_t, int,
    ...);

#endif	/* RVSCSI_ILLUMOS_H */
