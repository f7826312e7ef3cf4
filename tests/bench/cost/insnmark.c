// SPDX-License-Identifier: GPL-2.0
/*
 * insnmark start|profile|stop: executes the marker instruction the insncount QEMU
 * plugin recognises (see insncount.c).  On real hardware, and in a QEMU
 * without the plugin, it is a NOP.
 */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "start")) {
		__asm__ volatile(".byte 0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x7e, 0x5a, 0x1d");
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "profile")) {
		__asm__ volatile(".byte 0x66, 0x0f, 0x1f, 0x84, 0x00, 0x02, 0x7e, 0x5a, 0x1d");
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "stop")) {
		__asm__ volatile(".byte 0x66, 0x0f, 0x1f, 0x84, 0x00, 0x01, 0x7e, 0x5a, 0x1d");
		return 0;
	}
	fprintf(stderr, "usage: insnmark start|profile|stop\n");
	return 2;
}
