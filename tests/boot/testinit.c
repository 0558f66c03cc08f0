/*
 * A stand-in /init for checking boot artifacts before celld is ready: it prints
 *   CELLD-TEST-INIT version=<celld.image_version from /proc/cmdline> uptime=<s>
 * on the console, then powers the machine off so QEMU exits. Built with gcc -static so
 * cellimg's static-ELF check accepts it. It refuses to run unless it is PID 1: on a
 * build host it would otherwise power the host off.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

static void read_file(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, size - 1);
    buf[n > 0 ? n : 0] = '\0';
    if (fd >= 0)
        close(fd);
}

int main(void) {
    if (getpid() != 1) {
        fprintf(stderr, "testinit: refusing to run: not PID 1\n");
        return 1;
    }
    mount("proc", "/proc", "proc", 0, NULL);

    char uptime[64], cmdline[4096], version[128] = "missing";
    read_file("/proc/uptime", uptime, sizeof uptime);
    read_file("/proc/cmdline", cmdline, sizeof cmdline);
    char *key = strstr(cmdline, "celld.image_version=");
    if (key) {
        key += strlen("celld.image_version=");
        size_t len = strcspn(key, " \n");
        if (len >= sizeof version)
            len = sizeof version - 1;
        memcpy(version, key, len);
        version[len] = '\0';
    }
    uptime[strcspn(uptime, " ")] = '\0';

    /* The cpio carries /dev/console; fall back to devtmpfs if it did not. */
    int console = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (console < 0 && mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) == 0)
        console = open("/dev/console", O_WRONLY | O_NOCTTY);
    char line[512];
    int len = snprintf(line, sizeof line, "\nCELLD-TEST-INIT version=%s uptime=%s\n", version,
                       uptime);
    if (console >= 0)
        write(console, line, (size_t)len);

    sync();
    reboot(RB_POWER_OFF);
    /* PID 1 must not exit (the kernel panics); with panic=-1 that reboots, which
     * -no-reboot turns into a QEMU exit anyway. */
    for (;;)
        pause();
}
