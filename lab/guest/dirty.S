# dirty.S -- the "memory-dirtying" guest for drover's migration tests.
#
# Why this exists: a live migration is only interesting when the guest keeps
# dirtying RAM while pre-copy runs.  A real OS image is large, slow to boot
# under TCG and dirties memory at an unpredictable rate.  This kernel is a few
# KB, boots straight from QEMU's -kernel (multiboot v1), and then does nothing
# but rewrite a fixed RAM region as fast as the vCPU allows, so the dirty rate
# is high, steady and easy to reason about.  After every full pass it bumps a
# 32-bit counter at a fixed guest-physical address; the test harness reads it
# over the QEMU monitor (HMP "xp") to prove the guest is running -- before,
# during and after a migration -- without any guest agent or network.
#
# Build: only through lab/kernel.py (build_dirty_kernel).  It passes the
# addresses below with `as --defsym`, so Python is the single source of truth
# for them.  It assembles with `as --32` and links with
# `ld -m elf_i386 -Ttext=0x100000`; no C compiler or multilib is needed.
#
# Note: this file is fed straight to `as`, not through the C preprocessor, so
# comments use '#' only.  On i386 '/' may start a comment too, so no division
# appears anywhere below.

# ---------------------------------------------------------------------------
# Parameters supplied by lab/kernel.py with --defsym.  Failing loudly here
# beats silently assembling with a stale copy of an address.
# ---------------------------------------------------------------------------
.ifndef PASS_COUNTER_ADDR
        .error "PASS_COUNTER_ADDR undefined: build with lab.kernel.build_dirty_kernel()"
.endif
.ifndef DIRTY_REGION_BASE
        .error "DIRTY_REGION_BASE undefined: build with lab.kernel.build_dirty_kernel()"
.endif
.ifndef DIRTY_REGION_SIZE
        .error "DIRTY_REGION_SIZE undefined: build with lab.kernel.build_dirty_kernel()"
.endif

# The counter must not live inside the region we scribble over, or the pass
# count would be overwritten with random words.
.if (PASS_COUNTER_ADDR >= DIRTY_REGION_BASE) && (PASS_COUNTER_ADDR < (DIRTY_REGION_BASE + DIRTY_REGION_SIZE))
        .error "PASS_COUNTER_ADDR lies inside the dirty region"
.endif
# The inner loop stores whole 32-bit words and stops on an exact end address.
.if (DIRTY_REGION_BASE & 3) || (DIRTY_REGION_SIZE & 3) || (PASS_COUNTER_ADDR & 3)
        .error "dirty region and pass counter must be 4-byte aligned"
.endif

# ---------------------------------------------------------------------------
# Fixed constants.
# ---------------------------------------------------------------------------
# Multiboot v1.  Flags bit 16 ("a.out kludge": use load addresses from the
# header) is deliberately clear, so QEMU's -kernel loader reads our ELF
# program headers instead.  We ask the loader for nothing else (no memory
# map, no module alignment, no video mode): flags = 0.
.set MB_MAGIC,     0x1BADB002
.set MB_FLAGS,     0x00000000
# magic + flags + checksum must be 0 (mod 2^32).
.set MB_CHECKSUM,  -(MB_MAGIC + MB_FLAGS)

# COM1, a 16550 UART.  Writing to it is the only way this kernel can show
# signs of life to a human (libvirt/QEMU serial "file" device).
.set COM1,         0x3F8
.set UART_THR,     COM1 + 0     # transmit holding register (DLAB=0)
.set UART_DLL,     COM1 + 0     # divisor latch low (DLAB=1)
.set UART_IER,     COM1 + 1     # interrupt enable (DLAB=0)
.set UART_DLM,     COM1 + 1     # divisor latch high (DLAB=1)
.set UART_FCR,     COM1 + 2     # FIFO control
.set UART_LCR,     COM1 + 3     # line control
.set UART_MCR,     COM1 + 4     # modem control
.set UART_LSR,     COM1 + 5     # line status
.set LSR_THRE,     0x20         # transmit holding register empty

# Print a progress line every this many passes.  Serial output is a trapped
# port write per byte under TCG/KVM, so keep it rare and short.
.set REPORT_EVERY, 25

# xorshift32 needs a non-zero seed (zero is a fixed point).  The state is
# carried across passes, so every pass writes *different* words: that defeats
# zero-page detection and XBZRLE/compression shortcuts, so every page really
# has to be re-sent by the migration.
.set XORSHIFT_SEED, 0x2545F491

.set ASCII_0,      0x30
.set ASCII_LF,     0x0A

.set STACK_SIZE,   16384

# ---------------------------------------------------------------------------
# Code.  The multiboot header must be 4-byte aligned and within the first
# 8 KiB of the file; putting it first in .text guarantees that.
# ---------------------------------------------------------------------------
        .text
        .code32
        .align 4
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long MB_CHECKSUM

        .globl _start
_start:
        # Multiboot hands over in 32-bit protected mode with flat segments and
        # paging off, but with no usable stack and no IDT.  Interrupts are
        # already off per the spec; clear IF anyway, since any interrupt
        # without an IDT would triple-fault the guest.  Clear DF so string
        # instructions (lodsb) walk forwards.
        cli
        cld
        movl    $stack_top, %esp

        # RAM is zero on a cold boot, but be explicit: the counter counts
        # passes of *this* boot (a guest reset starts again from 0).
        movl    $0, PASS_COUNTER_ADDR

        call    serial_init
        movl    $msg_start, %esi
        call    serial_puts

        # Register roles in the hot loop (kept out of memory for speed):
        #   eax = xorshift32 state     edi = store pointer
        #   ebx = end of region        edx = scratch
        #   ebp = passes left until the next serial report
        movl    $XORSHIFT_SEED, %eax
        movl    $REPORT_EVERY, %ebp

next_pass:
        movl    $DIRTY_REGION_BASE, %edi
        movl    $(DIRTY_REGION_BASE + DIRTY_REGION_SIZE), %ebx

next_word:
        # xorshift32 (Marsaglia 2003): x ^= x<<13; x ^= x>>17; x ^= x<<5.
        # Cheap, full-period over non-zero 32-bit values, no multiply.
        movl    %eax, %edx
        shll    $13, %edx
        xorl    %edx, %eax
        movl    %eax, %edx
        shrl    $17, %edx
        xorl    %edx, %eax
        movl    %eax, %edx
        shll    $5, %edx
        xorl    %edx, %eax

        movl    %eax, (%edi)
        addl    $4, %edi
        cmpl    %ebx, %edi
        jb      next_word

        # One full pass done: publish it.  A single aligned 32-bit add, so
        # the monitor never sees a torn value.
        incl    PASS_COUNTER_ADDR

        decl    %ebp
        jnz     next_pass
        movl    $REPORT_EVERY, %ebp
        call    report_pass
        jmp     next_pass

# ---------------------------------------------------------------------------
# Serial helpers.  Polled, no interrupts: we have no IDT and want none.
# ---------------------------------------------------------------------------

# serial_init: program COM1 for 115200 8N1 with FIFOs.  QEMU's UART ignores
# the baud rate, but doing the standard sequence keeps the kernel honest on
# any 16550 and leaves the line in a known state after a reset.
# Clobbers: eax, edx.
serial_init:
        movw    $UART_IER, %dx          # no UART interrupts: we poll
        movb    $0x00, %al
        outb    %al, %dx
        movw    $UART_LCR, %dx          # DLAB=1 to reach the divisor latch
        movb    $0x80, %al
        outb    %al, %dx
        movw    $UART_DLL, %dx          # divisor 1 = 115200 baud
        movb    $0x01, %al
        outb    %al, %dx
        movw    $UART_DLM, %dx
        movb    $0x00, %al
        outb    %al, %dx
        movw    $UART_LCR, %dx          # 8 data bits, no parity, 1 stop; DLAB=0
        movb    $0x03, %al
        outb    %al, %dx
        movw    $UART_FCR, %dx          # enable + clear FIFOs
        movb    $0xC7, %al
        outb    %al, %dx
        movw    $UART_MCR, %dx          # DTR + RTS asserted
        movb    $0x03, %al
        outb    %al, %dx
        ret

# serial_putc: send the byte in al.  Waits for THRE so bytes are never
# dropped on a real (or rate-limited) UART.
# Preserves: eax, ebx, ecx, esi, edi, ebp.  Clobbers: edx.
serial_putc:
        pushl   %eax
        movw    $UART_LSR, %dx
1:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      1b
        popl    %eax
        movw    $UART_THR, %dx
        outb    %al, %dx
        ret

# serial_puts: send the NUL-terminated string at esi.
# Clobbers: eax, edx, esi.
serial_puts:
1:      lodsb
        testb   %al, %al
        jz      2f
        call    serial_putc
        jmp     1b
2:      ret

# serial_putdec: send eax as an unsigned decimal number.  Digits come out of
# the division least-significant first, so park them on the stack and pop
# them back in print order.
# Clobbers: eax, ecx, edx, esi.
serial_putdec:
        movl    $10, %ecx
        xorl    %esi, %esi              # digit count
1:      xorl    %edx, %edx
        divl    %ecx                    # eax = eax div 10, edx = remainder
        pushl   %edx
        incl    %esi
        testl   %eax, %eax
        jnz     1b
2:      popl    %eax
        addb    $ASCII_0, %al
        call    serial_putc
        decl    %esi
        jnz     2b
        ret

# report_pass: print "dirty: pass N\n" with the current counter value.
# Called from the hot loop, so it preserves every register it touches.
report_pass:
        pushal
        movl    $msg_pass, %esi
        call    serial_puts
        movl    PASS_COUNTER_ADDR, %eax
        call    serial_putdec
        movb    $ASCII_LF, %al
        call    serial_putc
        popal
        ret

# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------
        .section .rodata
msg_start:
        .asciz "dirty: start\n"
msg_pass:
        .asciz "dirty: pass "

        # Stack lives in .bss: QEMU's ELF loader zero-fills it, and it costs
        # nothing in the file.
        .section .bss
        .align 16
stack_bottom:
        .skip STACK_SIZE
stack_top:

        # We never execute from the stack; say so, so ld does not warn about
        # (or mark) an executable stack.
        .section .note.GNU-stack, "", @progbits
