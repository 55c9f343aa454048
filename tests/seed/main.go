// The Go program of the blog post "UDP Firewall Holepunching / NAT Traversal with Golang"
// (the seed of qpunch: /work/shared/seed/udp-hole-punching-with-go.txt in the project's
// notes), reconstructed so qpunch's tests can check that both directions interoperate.
//
// doServer and doClient are copied verbatim from the post. Added here, because the post
// does not show them: the package clause, the imports, and a minimal main that follows
// the post's usage ("./udp-hole-punch" runs the server on UDP4 port 9199,
// "./udp-hole-punch <remote-address>" runs the client against that port), plus a -port
// flag so tests can pick a free port.
package main

import (
	"flag"
	"fmt"
	"net"
	"strconv"
)

func doServer(port int) {
	msgBuf := make([]byte, 1024)

	// Initiatlize a UDP listener
	ln, err := net.ListenUDP("udp4", &net.UDPAddr{Port: port})
	if err != nil {
		fmt.Printf("Unable to listen on :%d\n", port)
		return
	}

	fmt.Printf("Listening on :%d\n", port)

	for {
		fmt.Println("---")
		// Await incoming packets
		rcvLen, addr, err := ln.ReadFrom(msgBuf)
		if err != nil {
			fmt.Println("Transaction was initiated but encountered an error!")
			continue
		}

		fmt.Printf("Received a packet from: %s\n\tSays: %s\n",
			addr.String(), msgBuf[:rcvLen])

		// Let the client confirm a hole was punched through to us
		reply := "お帰り~"
		copy(msgBuf, []byte(reply))
		_, err = ln.WriteTo(msgBuf[:len(reply)], addr)

		if err != nil {
			fmt.Println("Socket closed unexpectedly!")
			continue
		}

		fmt.Printf("Sent reply to %s\n\tReply: %s\n",
			addr.String(), msgBuf[:len(reply)])
	}
}

func doClient(remote string, port int) {
	msgBuf := make([]byte, 1024)

  // Resolve the passed address as UDP4
	toAddr, err := net.ResolveUDPAddr("udp4", remote + ":" + strconv.Itoa(port))
	if err != nil {
		fmt.Printf("Could not resolve %s:%d\n", remote, port)
		return
	}

	fmt.Printf("Trying to punch a hole to %s:%d\n", remote, port)

	// Initiate the transaction (force IPv4 to demo firewall punch)
	conn, err := net.DialUDP("udp4", nil, toAddr)
	defer conn.Close()

	if err != nil {
		fmt.Printf("Unable to connect to %s:%d\n", remote, port)
		return
	}

	// Initiate the transaction, creating the hole
	msg := "ただいま~"
	fmt.Fprintf(conn, msg)
	fmt.Printf("Sent a UDP packet to %s:%d\n\tSent: %s\n", remote, port, msg)

	// Await a response through our firewall hole
	msgLen, fromAddr, err := conn.ReadFromUDP(msgBuf)
	if err != nil {
		fmt.Printf("Error reading UDP response!\n")
		return
	}

	fmt.Printf("Received a UDP packet back from %s:%d\n\tResponse: %s\n",
		fromAddr.IP, fromAddr.Port, msgBuf[:msgLen])

	fmt.Println("Success: NAT traversed! ^-^")
}

// Added for qpunch's tests (not in the post): seed [-port N] [remote-address]
func main() {
	port := flag.Int("port", 9199, "UDP port: the server listens on it, the client sends to it")
	flag.Parse()
	if flag.NArg() == 0 {
		doServer(*port)
	} else {
		doClient(flag.Arg(0), *port)
	}
}
