/*
 * The variadic DDI functions of the emulation. Rust cannot define C
 * variadic functions, so these format the message (the driver only uses
 * conversions that glibc's vsnprintf and illumos's cmn_err agree on) and
 * hand it to the Rust side.
 */
#include <stdarg.h>
#include <stdio.h>

/* Implemented in Rust (ddi/log.rs). */
extern void rvscsi_emu_log(void *dip, int level, const char *msg);
extern void rvscsi_emu_panic(const char *msg) __attribute__((noreturn));

#define MSG_MAX 512

void
cmn_err(int level, const char *fmt, ...)
{
	char buf[MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	(void) vsnprintf(buf, sizeof (buf), fmt, ap);
	va_end(ap);
	rvscsi_emu_log((void *)0, level, buf);
}

void
dev_err(void *dip, int level, char *fmt, ...)
{
	char buf[MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	(void) vsnprintf(buf, sizeof (buf), fmt, ap);
	va_end(ap);
	rvscsi_emu_log(dip, level, buf);
}

void
scsi_log(void *dip, char *label, unsigned int level, const char *fmt, ...)
{
	char buf[MSG_MAX];
	va_list ap;

	(void) label;
	va_start(ap, fmt);
	(void) vsnprintf(buf, sizeof (buf), fmt, ap);
	va_end(ap);
	rvscsi_emu_log(dip, (int)level, buf);
}

void
panic(const char *fmt, ...)
{
	char buf[MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	(void) vsnprintf(buf, sizeof (buf), fmt, ap);
	va_end(ap);
	rvscsi_emu_panic(buf);
}

/*
 * ddi_fm_ereport_post(9F): the payload list (name, data_type_t, value...,
 * NULL) is taken apart here the way uts/common/os/fm.c i_fm_payload_set
 * reads it (uint8/16/32 and int8/16/32 and boolean_value as int-sized
 * varargs, the 64-bit types as 64-bit, strings as pointers, BOOLEAN with
 * no value) and handed to ddi/fm.rs. A type it does not know stops the
 * walk (the rest of the list cannot be found) and is reported.
 */
#define	EREPORT_MAX_MEMBERS	16

extern void rvscsi_emu_ereport_post(void *dip, const char *class_name,
    unsigned long long ena, int sflag, int n, const char **names,
    const int *types, const unsigned long long *values,
    const char **strings, int bad_type);

void
ddi_fm_ereport_post(void *dip, const char *error_class,
    unsigned long long ena, int sflag, ...)
{
	const char *names[EREPORT_MAX_MEMBERS];
	int types[EREPORT_MAX_MEMBERS];
	unsigned long long values[EREPORT_MAX_MEMBERS];
	const char *strings[EREPORT_MAX_MEMBERS];
	int n = 0, bad = 0;
	va_list ap;

	va_start(ap, sflag);
	for (;;) {
		const char *name = va_arg(ap, const char *);
		int t;

		if (name == (const char *)0)
			break;
		if (n == EREPORT_MAX_MEMBERS) {
			bad = -1;
			break;
		}
		t = va_arg(ap, int);
		names[n] = name;
		types[n] = t;
		values[n] = 0;
		strings[n] = (const char *)0;
		switch (t) {
		case 1:		/* DATA_TYPE_BOOLEAN: no value */
			break;
		case 2:		/* BYTE */
		case 3:		/* INT16 */
		case 4:		/* UINT16 */
		case 5:		/* INT32 */
		case 6:		/* UINT32 */
		case 21:	/* BOOLEAN_VALUE */
		case 22:	/* INT8 */
		case 23:	/* UINT8 */
			values[n] = va_arg(ap, unsigned int);
			break;
		case 7:		/* INT64 */
		case 8:		/* UINT64 */
		case 18:	/* HRTIME */
			values[n] = va_arg(ap, unsigned long long);
			break;
		case 9:		/* STRING */
			strings[n] = va_arg(ap, const char *);
			break;
		default:
			bad = t == 0 ? -2 : t;
			break;
		}
		if (bad != 0)
			break;
		n++;
	}
	va_end(ap);
	rvscsi_emu_ereport_post(dip, error_class, ena, sflag, n, names, types,
	    values, strings, bad);
}
