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
