/* The stand-in for a supervised program in supd's benchmarks (benchmarks/__main__.py).
 *
 *   helper sleep [ID]              record a start, then sleep until killed
 *   helper exit-after MS [ID]      record a start, sleep MS ms, record an exit, exit 0
 *   helper write BYTES [ID]        record a start, write BYTES of numbered lines, exit 0
 *   helper verify BYTES FILE...    check that FILEs, concatenated, hold exactly the
 *                                  numbered lines `write BYTES` produces; exit 0 if so
 *
 * With HELPER_STAMPS set, starts and exits are appended to that file as
 * "S ID NS" / "E ID NS" lines, NS being CLOCK_MONOTONIC nanoseconds (the clock of
 * Python's time.monotonic_ns). Each record is one write() on an O_APPEND fd, so records
 * of concurrent helpers never interleave. A respawn's latency is a start minus the
 * previous exit of the same ID.
 *
 * Lines are LINE_BYTES long: a zero-padded line number, a space, filler, "\n". Fixed
 * width makes the expected content of any offset computable, so the verifier needs no
 * state beyond the next line number. benchmarks/helper.py is the same program in Python,
 * for machines without a C compiler.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LINE_BYTES 64
#define NUMBER_DIGITS 12
#define CHUNK_LINES 1024

static long long monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

static void stamp(char kind, const char *id) {
    const char *path = getenv("HELPER_STAMPS");
    if (path == NULL || *path == '\0')
        return;
    char record[96];
    int length = snprintf(record, sizeof record, "%c %s %lld\n", kind, id, monotonic_ns());
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    ssize_t ignored = write(fd, record, (size_t)length);
    (void)ignored;
    close(fd);
}

/* A line of the stream, exactly LINE_BYTES long: line 0 to start with. */
static void first_line(char *line) {
    memset(line, '0', NUMBER_DIGITS);
    line[NUMBER_DIGITS] = ' ';
    memset(line + NUMBER_DIGITS + 1, 'x', LINE_BYTES - NUMBER_DIGITS - 2);
    line[LINE_BYTES - 1] = '\n';
}

/* Turns line N into line N+1 in place, like an odometer: no printf per line, so the
 * writer outruns any reader it is measured against. */
static void next_line(char *line) {
    for (int i = NUMBER_DIGITS - 1; i >= 0; i--) {
        if (line[i] != '9') {
            line[i]++;
            return;
        }
        line[i] = '0';
    }
}

static int write_all(int fd, const char *data, size_t size) {
    while (size > 0) {
        ssize_t written = write(fd, data, size);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += written;
        size -= (size_t)written;
    }
    return 0;
}

static int do_write(unsigned long long bytes) {
    static char chunk[CHUNK_LINES * LINE_BYTES];
    char line[LINE_BYTES];
    unsigned long long lines = bytes / LINE_BYTES, number = 0;
    first_line(line);
    while (number < lines) {
        unsigned long long batch = lines - number < CHUNK_LINES ? lines - number : CHUNK_LINES;
        for (unsigned long long i = 0; i < batch; i++, next_line(line))
            memcpy(chunk + i * LINE_BYTES, line, LINE_BYTES);
        if (write_all(STDOUT_FILENO, chunk, batch * LINE_BYTES) < 0)
            return 1;
        number += batch;
    }
    return 0;
}

/* Compares FILEs against the stream; reports the first difference. */
static int do_verify(unsigned long long bytes, int count, char **paths) {
    static char buffer[CHUNK_LINES * LINE_BYTES];
    char expected[LINE_BYTES];
    unsigned long long lines = bytes / LINE_BYTES, number = 0;
    size_t filled = 0;
    first_line(expected);
    for (int i = 0; i < count; i++) {
        int fd = open(paths[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            printf("bad cannot open %s: %s\n", paths[i], strerror(errno));
            return 1;
        }
        for (;;) {
            ssize_t got = read(fd, buffer + filled, sizeof buffer - filled);
            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0)
                break;
            filled += (size_t)got;
            size_t offset = 0;
            for (; filled - offset >= LINE_BYTES; offset += LINE_BYTES, number++) {
                if (number >= lines || memcmp(buffer + offset, expected, LINE_BYTES) != 0) {
                    printf("bad line %llu differs (expected %llu lines)\n", number, lines);
                    close(fd);
                    return 1;
                }
                next_line(expected);
            }
            memmove(buffer, buffer + offset, filled - offset);
            filled -= offset;
        }
        close(fd);
    }
    if (filled != 0 || number != lines) {
        printf("bad %llu complete lines of %llu, %zu stray bytes\n", number, lines, filled);
        return 1;
    }
    printf("ok %llu lines\n", number);
    return 0;
}

static int usage(void) {
    fputs("usage: helper sleep [ID] | exit-after MS [ID] | write BYTES [ID] | "
          "verify BYTES FILE...\n",
          stderr);
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return usage();
    const char *mode = argv[1];
    if (strcmp(mode, "sleep") == 0) {
        stamp('S', argc > 2 ? argv[2] : "0");
        for (;;)
            pause();
    }
    if (argc < 3)
        return usage();
    unsigned long long amount = strtoull(argv[2], NULL, 10);
    const char *id = argc > 3 ? argv[3] : "0";
    if (strcmp(mode, "exit-after") == 0) {
        stamp('S', id);
        struct timespec delay = {(time_t)(amount / 1000), (long)(amount % 1000) * 1000000L};
        while (nanosleep(&delay, &delay) < 0 && errno == EINTR) {
        }
        stamp('E', id);
        _exit(0);
    }
    if (strcmp(mode, "write") == 0) {
        stamp('S', id);
        int status = do_write(amount);
        stamp('E', id);
        return status;
    }
    if (strcmp(mode, "verify") == 0 && argc > 3)
        return do_verify(amount, argc - 3, argv + 3);
    return usage();
}
