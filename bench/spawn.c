/* bench/run's stopwatch: spawn.c STDERR-FILE CMD [ARG...]
 *
 * Runs CMD (stdin and stdout /dev/null, stderr to STDERR-FILE) and prints
 * "EXIT WALL_NS USER_US SYS_US MAXRSS_KIB" for it: wall time from just before
 * the spawn to the reap, and wait4's rusage of CMD and every child it waited
 * for. This is what `/usr/bin/time -v` does, with finer resolution.
 *
 * It is a small C program, not bench/measure.py itself, because ru_maxrss
 * counts the memory of the process that spawned CMD up to its exec: spawned
 * from Python, every command would show Python's 15 MiB. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: spawn STDERR-FILE CMD [ARG...]\n");
    return 2;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);

  struct timespec start, end;
  pid_t pid;
  clock_gettime(CLOCK_MONOTONIC, &start);
  int err = posix_spawnp(&pid, argv[2], &actions, NULL, argv + 2, environ);
  if (err != 0) {
    fprintf(stderr, "spawn: cannot run %s: error %d\n", argv[2], err);
    return 127;
  }
  int status;
  struct rusage usage;
  if (wait4(pid, &status, 0, &usage) < 0) {
    perror("spawn: wait4");
    return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &end);

  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  long long wall = (end.tv_sec - start.tv_sec) * 1000000000LL + (end.tv_nsec - start.tv_nsec);
  printf("%d %lld %lld %lld %ld\n", code, wall,
         usage.ru_utime.tv_sec * 1000000LL + usage.ru_utime.tv_usec,
         usage.ru_stime.tv_sec * 1000000LL + usage.ru_stime.tv_usec, usage.ru_maxrss);
  return 0;
}
